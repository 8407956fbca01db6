"""Identities and every cryptographic operation swarmnet needs, over PyNaCl.

Nothing here hand-writes a primitive: keys, signatures, sealed boxes, X25519,
XChaCha20-Poly1305 and BLAKE2b all come from libsodium through PyNaCl. The
formats follow the Session protocol and oxen-storage-server so that what the
testnet stores and relays is shaped like the real network's traffic.

Every failure raises a subclass of :class:`CryptoError`; no PyNaCl exception
escapes. Error messages never include key material or plaintext.
"""

from __future__ import annotations

import hashlib

import base64
import re
from dataclasses import dataclass, field
from typing import Callable

import nacl.bindings as sodium
import nacl.exceptions
import nacl.signing
import nacl.utils

__all__ = [
    "CryptoError", "BadKey", "BadSessionId", "BadSignature", "KeyMismatch",
    "DecryptionError", "MalformedBlob",
    "Identity", "random_bytes", "session_id_to_x25519", "ed25519_to_session_id",
    "seal_message", "open_message", "message_hash",
    "layer_key_client", "layer_key_node", "encrypt_with_key", "decrypt_with_key",
    "seal_layer_keyed", "open_layer_keyed", "seal_layer", "open_layer",
    "retrieve_signature_message", "delete_signature_message",
    "expire_signature_message", "sign_request", "verify_request", "check_account",
]

KEY_BYTES = 32  # ed25519 / x25519 public keys, x25519 secrets, seeds, layer keys
SIGNATURE_BYTES = 64
SEAL_OVERHEAD = sodium.crypto_box_SEALBYTES  # 32-byte ephemeral key + 16-byte MAC
NONCE_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES  # 24
AEAD_TAG_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES  # 16
SESSION_PREFIX = "05"

_PREFIXED_ID = re.compile(r"[0-9a-fA-F]{66}")


class CryptoError(Exception):
    """Base of every error raised by this module."""


class BadKey(CryptoError):
    """A key or seed has the wrong length or is not a usable curve point."""


class BadSessionId(BadKey):
    """A string is not a well-formed prefixed account id."""


class BadSignature(CryptoError):
    """An ed25519 signature does not verify."""


class KeyMismatch(CryptoError):
    """An ed25519 key does not belong to the account it claims."""


class DecryptionError(CryptoError):
    """A ciphertext does not decrypt: tampered, or sealed to another key."""


class MalformedBlob(DecryptionError):
    """A ciphertext or decrypted payload is too short to have the right shape."""


def random_bytes(n: int) -> bytes:
    """Return n bytes from libsodium's CSPRNG."""
    return nacl.utils.random(n)


# Every function here that needs fresh randomness (nonces, ephemeral keys, new
# identities) takes ``randbytes``: libsodium's CSPRNG in real runs, a seeded
# ``random.Random(...).randbytes`` in the simulation, so a seed replays exactly.
RandBytes = Callable[[int], bytes]


def _need_bytes(value: object, length: int, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray):
        raise BadKey(f"{what} must be bytes, got {type(value).__name__}")
    if len(value) != length:
        raise BadKey(f"{what} must be {length} bytes, got {len(value)}")
    return bytes(value)


def _blake2b_256(data: bytes) -> bytes:
    # The same unkeyed BLAKE2b-256 as libsodium's crypto_generichash; hashlib's
    # C binding skips PyNaCl's per-call argument checks (~10x cheaper per hash).
    return hashlib.blake2b(data, digest_size=32).digest()


def _ed_to_x(ed25519_public: bytes) -> bytes:
    ed25519_public = _need_bytes(ed25519_public, KEY_BYTES, "ed25519 public key")
    try:
        return sodium.crypto_sign_ed25519_pk_to_curve25519(ed25519_public)
    except nacl.exceptions.CryptoError:
        raise BadKey("ed25519 public key is not a valid curve point") from None


@dataclass(frozen=True)
class Identity:
    """An ed25519 key pair with its derived x25519 pair and Session id.

    Build with :meth:`from_seed` or :meth:`generate`; the constructor checks
    that every field is derived from ``seed``. repr shows public parts only.
    """

    seed: bytes = field(repr=False)
    ed25519_public: bytes
    ed25519_secret: bytes = field(repr=False)  # libsodium's 64-byte seed ‖ public
    x25519_public: bytes
    x25519_secret: bytes = field(repr=False)
    session_id: str

    def __post_init__(self) -> None:
        if Identity._derive(_need_bytes(self.seed, KEY_BYTES, "seed")) != (
            self.ed25519_public, self.ed25519_secret,
            self.x25519_public, self.x25519_secret, self.session_id,
        ):
            raise BadKey("identity fields are not derived from its seed")

    @staticmethod
    def _derive(seed: bytes) -> tuple[bytes, bytes, bytes, bytes, str]:
        ed_pk, ed_sk = sodium.crypto_sign_seed_keypair(seed)
        x_pk = sodium.crypto_sign_ed25519_pk_to_curve25519(ed_pk)
        x_sk = sodium.crypto_sign_ed25519_sk_to_curve25519(ed_sk)
        return ed_pk, ed_sk, x_pk, x_sk, SESSION_PREFIX + x_pk.hex()

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Identity from a 32-byte ed25519 seed.

        A 16-byte seed is padded with 16 zero bytes, as Session does for the
        seeds behind its recovery phrases.
        """
        if not isinstance(seed, bytes | bytearray):
            raise BadKey(f"seed must be bytes, got {type(seed).__name__}")
        if len(seed) == 16:
            seed = bytes(seed) + bytes(16)
        seed = _need_bytes(seed, KEY_BYTES, "seed (16 or 32 bytes)")
        return cls(seed, *cls._derive(seed))

    @classmethod
    def generate(cls, randbytes: RandBytes = random_bytes) -> Identity:
        """A fresh identity from a random 32-byte seed."""
        return cls.from_seed(randbytes(KEY_BYTES))

    def sign(self, msg: bytes) -> bytes:
        """Detached 64-byte ed25519 signature over msg."""
        return nacl.signing.SigningKey(self.seed).sign(bytes(msg)).signature

    def __repr__(self) -> str:
        return f"Identity(session_id={self.session_id!r}, ed25519_public={self.ed25519_public.hex()!r})"


def _parse_prefixed_id(session_id: object) -> bytes:
    """33 raw bytes (1 prefix byte ‖ 32 key bytes) of a 66-hex-character id."""
    if not isinstance(session_id, str) or not _PREFIXED_ID.fullmatch(session_id):
        shown = f"{len(session_id)} characters" if isinstance(session_id, str) else type(session_id).__name__
        raise BadSessionId(f"account id must be 66 hex characters, got {shown}")
    return bytes.fromhex(session_id)


def session_id_to_x25519(session_id: str) -> bytes:
    """The 32-byte x25519 public key in a "05"-prefixed Session id."""
    raw = _parse_prefixed_id(session_id)
    if raw[0] != 0x05:
        raise BadSessionId(f"Session id must start with 05, got {session_id[:2]!r}")
    return raw[1:]


def ed25519_to_session_id(ed25519_public: bytes) -> str:
    """The Session id ("05" + hex x25519 key) of a 32-byte ed25519 public key."""
    return SESSION_PREFIX + _ed_to_x(ed25519_public).hex()


def _verify(ed25519_public: bytes, message: bytes, signature: bytes) -> None:
    if not isinstance(signature, bytes | bytearray) or len(signature) != SIGNATURE_BYTES:
        raise BadSignature(f"signature must be {SIGNATURE_BYTES} bytes")
    try:
        key = nacl.signing.VerifyKey(_need_bytes(ed25519_public, KEY_BYTES, "ed25519 public key"))
        key.verify(bytes(message), bytes(signature))
    except BadKey as err:
        raise BadSignature(f"cannot verify: {err}") from None
    except nacl.exceptions.CryptoError:
        raise BadSignature("ed25519 signature does not verify") from None


# --- Session message encryption ---------------------------------------------

def seal_message(sender: Identity, recipient_session_id: str, plaintext: bytes,
                 randbytes: RandBytes | None = None) -> bytes:
    """Encrypt plaintext from sender to a Session id, as the Session protocol does.

    signature = sign(plaintext ‖ sender_ed_pub ‖ recipient_x_pub);
    blob = crypto_box_seal(plaintext ‖ sender_ed_pub ‖ signature, recipient_x_pub).
    The blob is len(plaintext) + 32 + 64 + 48 bytes.  With ``randbytes`` the
    sealed box's ephemeral key is drawn from it (see :func:`_box_seal_from`).
    """
    recipient_x = session_id_to_x25519(recipient_session_id)
    plaintext = bytes(plaintext)
    signature = sender.sign(plaintext + sender.ed25519_public + recipient_x)
    inner = plaintext + sender.ed25519_public + signature
    try:
        if randbytes is None:
            return sodium.crypto_box_seal(inner, recipient_x)
        return _box_seal_from(randbytes, inner, recipient_x)
    except nacl.exceptions.CryptoError:
        raise BadKey("recipient x25519 key is not usable") from None


def _box_seal_from(randbytes: RandBytes, message: bytes, recipient_x: bytes) -> bytes:
    """``crypto_box_seal`` with its ephemeral key pair made from ``randbytes``.

    libsodium draws that key itself, which a seeded run cannot replay; this is
    its construction, from libsodium's own primitives:
    ephemeral pair, nonce = blake2b-192(eph_pk ‖ recipient_pk),
    eph_pk ‖ crypto_box(message, nonce, recipient_pk, eph_sk).
    ``crypto_box_seal_open`` opens it (tested).
    """
    eph_pk, eph_sk = sodium.crypto_box_seed_keypair(randbytes(KEY_BYTES))
    nonce = hashlib.blake2b(eph_pk + recipient_x, digest_size=sodium.crypto_box_NONCEBYTES).digest()
    return eph_pk + sodium.crypto_box(message, nonce, recipient_x, eph_sk)


def open_message(recipient: Identity, blob: bytes) -> tuple[bytes, str]:
    """Decrypt a :func:`seal_message` blob; return (plaintext, sender Session id).

    Raises MalformedBlob if too short, DecryptionError if tampered or sealed
    to another key, BadSignature if the sender's signature does not cover
    this plaintext, sender key and recipient.
    """
    if not isinstance(blob, bytes | bytearray):
        raise MalformedBlob(f"blob must be bytes, got {type(blob).__name__}")
    minimum = SEAL_OVERHEAD + KEY_BYTES + SIGNATURE_BYTES
    if len(blob) < minimum:
        raise MalformedBlob(f"sealed message is {len(blob)} bytes, shorter than the minimum {minimum}")
    try:
        inner = sodium.crypto_box_seal_open(bytes(blob), recipient.x25519_public, recipient.x25519_secret)
    except nacl.exceptions.CryptoError:
        raise DecryptionError("sealed message does not open with this recipient's key") from None
    split = len(inner) - KEY_BYTES - SIGNATURE_BYTES
    plaintext, sender_ed, signature = inner[:split], inner[split:-SIGNATURE_BYTES], inner[-SIGNATURE_BYTES:]
    # Session: the signature covers the recipient key, so a message cannot be
    # re-sealed to someone else under the original sender's name.
    _verify(sender_ed, plaintext + sender_ed + recipient.x25519_public, signature)
    try:
        return plaintext, ed25519_to_session_id(sender_ed)
    except BadKey:
        raise BadSignature("sender ed25519 key has no x25519 form") from None


def message_hash(session_id: str, namespace: int, data: bytes) -> str:
    """Storage hash of a message: unpadded base64 of blake2b-256 over
    prefix byte ‖ 32 key bytes ‖ namespace as decimal text (omitted when 0) ‖ data.

    oxen-storage-server hashes the prefixed raw pubkey (0x05 for Session ids).
    """
    raw = _parse_prefixed_id(session_id)
    if isinstance(namespace, bool) or not isinstance(namespace, int):
        raise CryptoError(f"namespace must be an int, got {type(namespace).__name__}")
    ns = b"" if namespace == 0 else str(namespace).encode()
    digest = _blake2b_256(raw + ns + bytes(data))
    return base64.b64encode(digest).decode("ascii").rstrip("=")


# --- onion layers -----------------------------------------------------------

def _x25519(secret: bytes, public: bytes) -> bytes:
    try:
        return sodium.crypto_scalarmult(secret, public)
    except nacl.exceptions.CryptoError:
        raise BadKey("x25519 public key is a low-order point") from None


def layer_key_client(eph_secret: bytes, node_pub: bytes, eph_pub: bytes | None = None) -> bytes:
    """32-byte layer key on the client side:
    blake2b-256(X25519(eph_secret, node_pub) ‖ eph_pub ‖ node_pub).

    Pass ``eph_pub`` when it is at hand: deriving it costs a second X25519."""
    eph_secret = _need_bytes(eph_secret, KEY_BYTES, "ephemeral x25519 secret")
    node_pub = _need_bytes(node_pub, KEY_BYTES, "node x25519 public key")
    if eph_pub is None:
        eph_pub = sodium.crypto_scalarmult_base(eph_secret)
    return _blake2b_256(_x25519(eph_secret, node_pub) + eph_pub + node_pub)


def layer_key_node(node_secret: bytes, eph_pub: bytes, node_pub: bytes | None = None) -> bytes:
    """32-byte layer key on the node side; equals :func:`layer_key_client`.

    Pass the node's own ``node_pub`` when it is at hand (a node always has
    it): deriving it from the secret costs a second X25519 per layer."""
    node_secret = _need_bytes(node_secret, KEY_BYTES, "node x25519 secret")
    eph_pub = _need_bytes(eph_pub, KEY_BYTES, "ephemeral x25519 public key")
    if node_pub is None:
        node_pub = sodium.crypto_scalarmult_base(node_secret)
    return _blake2b_256(_x25519(node_secret, eph_pub) + eph_pub + node_pub)


def encrypt_with_key(key: bytes, plaintext: bytes, randbytes: RandBytes = random_bytes) -> bytes:
    """XChaCha20-Poly1305 under a 32-byte key: 24-byte random nonce ‖ ciphertext ‖ 16-byte tag."""
    key = _need_bytes(key, KEY_BYTES, "layer key")
    nonce = randbytes(NONCE_BYTES)
    return nonce + sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(bytes(plaintext), None, nonce, key)


def decrypt_with_key(key: bytes, blob: bytes) -> bytes:
    """Inverse of :func:`encrypt_with_key`; DecryptionError on tamper or short input."""
    key = _need_bytes(key, KEY_BYTES, "layer key")
    if not isinstance(blob, bytes | bytearray):
        raise MalformedBlob(f"ciphertext must be bytes, got {type(blob).__name__}")
    if len(blob) < NONCE_BYTES + AEAD_TAG_BYTES:
        raise MalformedBlob(f"ciphertext is {len(blob)} bytes, shorter than nonce and tag ({NONCE_BYTES + AEAD_TAG_BYTES})")
    blob = bytes(blob)
    try:
        return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(blob[NONCE_BYTES:], None, blob[:NONCE_BYTES], key)
    except nacl.exceptions.CryptoError:
        raise DecryptionError("ciphertext does not authenticate under this key") from None


def seal_layer_keyed(plaintext: bytes, node_x25519_public: bytes,
                     randbytes: RandBytes = random_bytes) -> tuple[bytes, bytes, bytes]:
    """Encrypt one onion layer to a node with a fresh ephemeral x25519 key.

    Returns (ephemeral_public, nonce ‖ ciphertext, key); the client keeps key
    to open the target's reply.
    """
    eph_pub, eph_secret = sodium.crypto_box_seed_keypair(randbytes(KEY_BYTES))
    key = layer_key_client(eph_secret, node_x25519_public, eph_pub)
    return eph_pub, encrypt_with_key(key, plaintext, randbytes), key


def open_layer_keyed(ciphertext: bytes, node_x25519_secret: bytes, ephemeral_public: bytes,
                     node_x25519_public: bytes | None = None) -> tuple[bytes, bytes]:
    """Decrypt one onion layer at a node; returns (plaintext, key) so the
    target can encrypt its reply under the same key."""
    key = layer_key_node(node_x25519_secret, ephemeral_public, node_x25519_public)
    return decrypt_with_key(key, ciphertext), key


def seal_layer(plaintext: bytes, node_x25519_public: bytes,
               randbytes: RandBytes = random_bytes) -> tuple[bytes, bytes]:
    """(ephemeral_public, nonce ‖ ciphertext) of one onion layer to a node."""
    eph_pub, ciphertext, _ = seal_layer_keyed(plaintext, node_x25519_public, randbytes)
    return eph_pub, ciphertext


def open_layer(ciphertext: bytes, node_x25519_secret: bytes, ephemeral_public: bytes) -> bytes:
    """Plaintext of one onion layer at the node it was sealed to."""
    return open_layer_keyed(ciphertext, node_x25519_secret, ephemeral_public)[0]


# --- request signatures (oxen-storage-server) --------------------------------

def _int_text(value: int, what: str) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CryptoError(f"{what} must be an int, got {type(value).__name__}")
    return str(value).encode()


def _hashes_text(hashes: list[str]) -> bytes:
    if isinstance(hashes, str) or not all(isinstance(h, str) for h in hashes):
        raise CryptoError("hashes must be a list of str")
    return "".join(hashes).encode()


def retrieve_signature_message(namespace: int, timestamp_ms: int) -> bytes:
    """b"retrieve" ‖ namespace (omitted when 0) ‖ timestamp_ms, as decimal text."""
    ns = b"" if namespace == 0 else _int_text(namespace, "namespace")
    return b"retrieve" + ns + _int_text(timestamp_ms, "timestamp_ms")


def delete_signature_message(hashes: list[str]) -> bytes:
    """b"delete" ‖ each message hash in order."""
    return b"delete" + _hashes_text(hashes)


def expire_signature_message(expiry_ms: int, hashes: list[str]) -> bytes:
    """b"expire" ‖ expiry_ms as decimal text ‖ each message hash in order."""
    return b"expire" + _int_text(expiry_ms, "expiry_ms") + _hashes_text(hashes)


def store_result_message(member_ed25519_hex: str, root: bytes) -> bytes:
    """b"store_result" ‖ the member's ed25519 key as hex ‖ a results root (32 bytes,
    :func:`results_root`): what a member of a swarm signs for the stores it holds, so that
    a target cannot claim a peer's acknowledgement (oxen-storage-server's members sign
    their store results; the member's key is in the message so a result cannot pass as
    another's)."""
    return b"store_result" + member_ed25519_hex.encode() + _need_bytes(root, 32, "results root")


def _result_leaf(message_hash: str) -> bytes:
    return hashlib.blake2b(b"\x00" + message_hash.encode(), digest_size=32).digest()


def _result_node(left: bytes, right: bytes) -> bytes:
    return hashlib.blake2b(b"\x01" + left + right, digest_size=32).digest()


def results_root(message_hashes: list[str]) -> tuple[bytes, list[list[bytes]]]:
    """The Merkle root of the message hashes a member holds from one request, and each
    one's path to it (a list of 33-byte steps: 0 = the sibling is on the left, 1 = on the
    right, then the sibling): one signature over the root vouches for every hash in it,
    and a client shown one hash's path learns the other hashes only as one-way digests.
    A lone hash's root is its leaf (an empty path); an odd node rises unpaired."""
    if not message_hashes:
        raise CryptoError("a results root needs at least one message hash")
    level = [_result_leaf(h) for h in message_hashes]
    paths: list[list[bytes]] = [[] for _ in message_hashes]
    members = [[i] for i in range(len(level))]  # the leaves under each node of the level
    while len(level) > 1:
        nxt, nxt_members = [], []
        for j in range(0, len(level) - 1, 2):
            left, right = level[j], level[j + 1]
            for i in members[j]:
                paths[i].append(b"\x01" + right)
            for i in members[j + 1]:
                paths[i].append(b"\x00" + left)
            nxt.append(_result_node(left, right))
            nxt_members.append(members[j] + members[j + 1])
        if len(level) % 2:
            nxt.append(level[-1])
            nxt_members.append(members[-1])
        level, members = nxt, nxt_members
    return level[0], paths


def results_root_from(message_hash: str, path: object) -> bytes:
    """The root a hash and its path (from :func:`results_root`) lead to; CryptoError when the
    path is malformed."""
    if not isinstance(path, list) or len(path) > 64:
        raise CryptoError("a results path must be a list of at most 64 steps")
    node = _result_leaf(message_hash)
    for step in path:
        if not isinstance(step, bytes) or len(step) != 33 or step[0] not in (0, 1):
            raise CryptoError("each results path step must be 33 bytes: side, sibling")
        node = _result_node(step[1:], node) if step[0] == 0 else _result_node(node, step[1:])
    return node


def sign_fast(identity: Identity, message: bytes) -> bytes:
    """:meth:`Identity.sign` without rebuilding the signing key from its seed (half the cost):
    for signatures a node makes per message."""
    return sodium.crypto_sign(bytes(message), identity.ed25519_secret)[:SIGNATURE_BYTES]


def link_open_message(src_ed25519_hex: str, dst_ed25519_hex: str) -> bytes:
    """b"open_link" ‖ the dialling node's ed25519 key ‖ b"->" ‖ the dialled node's, as hex: what a
    node signs to ask its testnet's controller for the proxy of one of its links (no timestamp:
    asking twice is harmless, and a node under a clock fault must still reach its peers)."""
    return b"open_link" + src_ed25519_hex.encode() + b"->" + dst_ed25519_hex.encode()


def sign_request(identity: Identity, message: bytes) -> bytes:
    """64-byte ed25519 signature of a request message by the account."""
    return identity.sign(message)


def verify_request(ed25519_public: bytes, message: bytes, signature: bytes) -> None:
    """Check a request signature; raises BadSignature (also for malformed key or signature)."""
    _verify(ed25519_public, message, signature)


def check_account(session_id: str, ed25519_public: bytes) -> None:
    """Check that an ed25519 key is the one behind a "05" Session id.

    oxen-storage-server: a 05 account signs with its ed25519 key, which must
    convert to the x25519 key in the id. Raises KeyMismatch otherwise.
    """
    expected = session_id_to_x25519(session_id)
    try:
        actual = _ed_to_x(ed25519_public)
    except BadKey as err:
        raise KeyMismatch(f"ed25519 key cannot belong to any account: {err}") from None
    if actual != expected:
        raise KeyMismatch("ed25519 key does not convert to this Session id's x25519 key")
