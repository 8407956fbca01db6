pytest_plugins = ["testnet.fixtures"]
