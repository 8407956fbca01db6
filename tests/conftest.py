pytest_plugins = ["testnet.fixtures", "testnet.cluster.fixtures"]
