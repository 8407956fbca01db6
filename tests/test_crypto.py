"""Tests for testnet.base.crypto: vectors, round trips, tampering, Session interop."""

import base64
import hashlib

import nacl.bindings as sodium
import nacl.exceptions
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testnet.base import crypto
from testnet.base.crypto import (
    BadKey, BadSessionId, BadSignature, CryptoError, DecryptionError, Identity,
    KeyMismatch, MalformedBlob,
)

VECTOR_SEED = bytes.fromhex("0123456789abcdef0123456789abcdef")
VECTOR_ID = "05d2ad010eeb72d72e561d9de7bd7b6989af77dcabffa03a5111a6c859ae5c3a72"
FAST = settings(max_examples=100, deadline=None)

ALICE = Identity.from_seed(bytes(range(32)))
BOB = Identity.from_seed(bytes(range(1, 33)))
CAROL = Identity.from_seed(bytes(range(2, 34)))
MALLORY = Identity.from_seed(bytes(range(3, 35)))
SEAL_MIN = 48 + 32 + 64  # sealed box overhead + sender key + signature


def flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


def manual_seal(signer: Identity, claimed_ed: bytes, signed_for_x: bytes, sealed_to_x: bytes, plaintext: bytes) -> bytes:
    """The Session construction done by hand, with knobs to break each part."""
    sig = signer.sign(plaintext + claimed_ed + signed_for_x)
    return sodium.crypto_box_seal(plaintext + claimed_ed + sig, sealed_to_x)


# --- vectors ------------------------------------------------------------------

def test_session_id_vector_with_padded_16_byte_seed():
    ident = Identity.from_seed(VECTOR_SEED)
    assert ident.session_id == VECTOR_ID
    assert ident.seed == VECTOR_SEED + bytes(16)
    assert Identity.from_seed(VECTOR_SEED + bytes(16)) == ident


def test_message_hash_vector():
    assert crypto.message_hash(VECTOR_ID, 0, b"abc 123") == "iBlnwojt+9l6J5m8qipR6tD4GRzWxy2z9UxAlUX6hLQ"


# --- identity ---------------------------------------------------------------

def test_identity_fields_are_consistent():
    pk, sk = sodium.crypto_sign_seed_keypair(ALICE.seed)
    assert (ALICE.ed25519_public, ALICE.ed25519_secret) == (pk, sk)
    assert ALICE.x25519_public == sodium.crypto_sign_ed25519_pk_to_curve25519(pk)
    assert ALICE.x25519_secret == sodium.crypto_sign_ed25519_sk_to_curve25519(sk)
    assert sodium.crypto_scalarmult_base(ALICE.x25519_secret) == ALICE.x25519_public
    assert ALICE.session_id == "05" + ALICE.x25519_public.hex()
    assert [len(x) for x in (ALICE.seed, ALICE.ed25519_public, ALICE.ed25519_secret,
                             ALICE.x25519_public, ALICE.x25519_secret)] == [32, 32, 64, 32, 32]


@pytest.mark.parametrize("length", [0, 1, 15, 17, 31, 33, 64])
def test_from_seed_rejects_other_lengths(length):
    with pytest.raises(BadKey, match="16 or 32 bytes"):
        Identity.from_seed(bytes(length))


def test_from_seed_rejects_non_bytes():
    with pytest.raises(BadKey):
        Identity.from_seed("00" * 32)  # type: ignore[arg-type]


def test_constructor_rejects_fields_not_derived_from_seed():
    with pytest.raises(BadKey):
        Identity(BOB.seed, ALICE.ed25519_public, ALICE.ed25519_secret,
                 ALICE.x25519_public, ALICE.x25519_secret, ALICE.session_id)
    with pytest.raises(BadKey):
        Identity(b"short", ALICE.ed25519_public, ALICE.ed25519_secret,
                 ALICE.x25519_public, ALICE.x25519_secret, ALICE.session_id)


def test_generate_gives_distinct_identities():
    a, b = Identity.generate(), Identity.generate()
    assert a.session_id != b.session_id and a.seed != b.seed


def test_sign_is_a_valid_detached_ed25519_signature():
    sig = ALICE.sign(b"hello")
    assert len(sig) == 64
    nacl.signing.VerifyKey(ALICE.ed25519_public).verify(b"hello", sig)
    with pytest.raises(nacl.exceptions.BadSignatureError):
        nacl.signing.VerifyKey(ALICE.ed25519_public).verify(b"hellO", sig)


def test_repr_shows_no_secrets():
    for text in (repr(ALICE), str(ALICE), f"{ALICE}"):
        assert ALICE.session_id in text
        for secret in (ALICE.seed, ALICE.ed25519_secret, ALICE.x25519_secret):
            assert secret.hex() not in text
            assert repr(secret) not in text
            assert secret[:8].hex() not in text


# --- session ids --------------------------------------------------------------

def test_session_id_to_x25519_accepts_either_case():
    assert crypto.session_id_to_x25519(VECTOR_ID) == bytes.fromhex(VECTOR_ID[2:])
    assert crypto.session_id_to_x25519(VECTOR_ID.upper()) == bytes.fromhex(VECTOR_ID[2:])


@pytest.mark.parametrize("bad", [
    "", "05", VECTOR_ID[:-1], VECTOR_ID + "0", "03" + VECTOR_ID[2:], "15" + VECTOR_ID[2:],
    VECTOR_ID[:-1] + "g", " " + VECTOR_ID[1:], VECTOR_ID[:-1] + "\n", "0x" + VECTOR_ID[2:],
    VECTOR_ID.encode(), None, 5,
])
def test_session_id_to_x25519_rejects_malformed(bad):
    with pytest.raises(BadSessionId):
        crypto.session_id_to_x25519(bad)


def test_ed25519_to_session_id():
    assert crypto.ed25519_to_session_id(BOB.ed25519_public) == BOB.session_id
    with pytest.raises(BadKey):
        crypto.ed25519_to_session_id(BOB.ed25519_public[:31])


# --- Session message encryption ----------------------------------------------

def test_seal_open_round_trip():
    blob = crypto.seal_message(ALICE, BOB.session_id, b"hi bob")
    assert len(blob) == len(b"hi bob") + SEAL_MIN
    assert crypto.open_message(BOB, blob) == (b"hi bob", ALICE.session_id)


def test_seal_open_empty_plaintext():
    assert crypto.open_message(BOB, crypto.seal_message(ALICE, BOB.session_id, b"")) == (b"", ALICE.session_id)


def test_sealing_is_randomised():
    assert crypto.seal_message(ALICE, BOB.session_id, b"x") != crypto.seal_message(ALICE, BOB.session_id, b"x")


def test_seal_to_malformed_session_id():
    with pytest.raises(BadSessionId):
        crypto.seal_message(ALICE, BOB.session_id[2:], b"x")


def test_open_with_wrong_recipient():
    blob = crypto.seal_message(ALICE, BOB.session_id, b"for bob")
    with pytest.raises(DecryptionError, match="does not open"):
        crypto.open_message(CAROL, blob)


def test_every_flipped_byte_of_blob_is_rejected():
    blob = crypto.seal_message(ALICE, BOB.session_id, b"0123456789")
    for i in range(len(blob)):
        with pytest.raises(DecryptionError):
            crypto.open_message(BOB, flip(blob, i))


def test_truncated_blobs_are_rejected():
    blob = crypto.seal_message(ALICE, BOB.session_id, b"0123456789")
    for n in range(len(blob)):
        err = MalformedBlob if n < SEAL_MIN else DecryptionError
        with pytest.raises(err):
            crypto.open_message(BOB, blob[:n])


def test_non_bytes_blob():
    with pytest.raises(MalformedBlob):
        crypto.open_message(BOB, "x" * 200)  # type: ignore[arg-type]


def test_forged_sender_claiming_another_ed_key():
    # Mallory puts Alice's ed25519 key in the box but can only sign with her own.
    blob = manual_seal(MALLORY, ALICE.ed25519_public, BOB.x25519_public, BOB.x25519_public, b"from alice?")
    with pytest.raises(BadSignature):
        crypto.open_message(BOB, blob)


def test_honest_mallory_is_named_as_mallory():
    blob = manual_seal(MALLORY, MALLORY.ed25519_public, BOB.x25519_public, BOB.x25519_public, b"me")
    assert crypto.open_message(BOB, blob) == (b"me", MALLORY.session_id)


def test_resealing_to_another_recipient_is_rejected():
    # Bob forwards Alice's signed payload to Carol: the signature names Bob.
    inner = sodium.crypto_box_seal_open(
        crypto.seal_message(ALICE, BOB.session_id, b"secret"), BOB.x25519_public, BOB.x25519_secret)
    resealed = sodium.crypto_box_seal(inner, CAROL.x25519_public)
    with pytest.raises(BadSignature):
        crypto.open_message(CAROL, resealed)


def test_flipped_signature_or_plaintext_inside_a_valid_box():
    inner = sodium.crypto_box_seal_open(
        crypto.seal_message(ALICE, BOB.session_id, b"payload"), BOB.x25519_public, BOB.x25519_secret)
    for i in (0, 6, len(inner) - 64, len(inner) - 1, len(inner) - 96):
        with pytest.raises(BadSignature):
            crypto.open_message(BOB, sodium.crypto_box_seal(flip(inner, i), BOB.x25519_public))


def test_garbage_sender_key_is_a_bad_signature():
    for ed in (bytes(32), b"\xff" * 32):
        blob = sodium.crypto_box_seal(b"p" + ed + bytes(64), BOB.x25519_public)
        with pytest.raises(BadSignature):
            crypto.open_message(BOB, blob)


def test_interop_manual_session_blob_opens():
    seed = b"\x42" * 32
    ed_pk, ed_sk = sodium.crypto_sign_seed_keypair(seed)
    recipient_x = bytes.fromhex(BOB.session_id[2:])
    plaintext = b"hand-made"
    sig = sodium.crypto_sign(plaintext + ed_pk + recipient_x, ed_sk)[:64]
    blob = sodium.crypto_box_seal(plaintext + ed_pk + sig, recipient_x)
    sender_id = "05" + sodium.crypto_sign_ed25519_pk_to_curve25519(ed_pk).hex()
    assert crypto.open_message(BOB, blob) == (plaintext, sender_id)


def test_interop_seal_message_opens_by_hand():
    blob = crypto.seal_message(ALICE, BOB.session_id, b"to be read by hand")
    inner = sodium.crypto_box_seal_open(blob, BOB.x25519_public, BOB.x25519_secret)
    plaintext, ed_pk, sig = inner[:-96], inner[-96:-64], inner[-64:]
    assert plaintext == b"to be read by hand" and ed_pk == ALICE.ed25519_public
    nacl.signing.VerifyKey(ed_pk).verify(plaintext + ed_pk + BOB.x25519_public, sig)


@FAST
@given(st.binary(max_size=2000))
def test_seal_open_property(plaintext):
    blob = crypto.seal_message(CAROL, ALICE.session_id, plaintext)
    assert crypto.open_message(ALICE, blob) == (plaintext, CAROL.session_id)


# --- message hash -----------------------------------------------------------

def reference_hash(raw: bytes, ns_text: bytes, data: bytes) -> str:
    digest = hashlib.blake2b(raw + ns_text + data, digest_size=32).digest()
    return base64.b64encode(digest).decode().rstrip("=")


@pytest.mark.parametrize("namespace", [1, 42, -10, 32767])
def test_message_hash_nonzero_namespace(namespace):
    h = crypto.message_hash(VECTOR_ID, namespace, b"abc 123")
    assert h != crypto.message_hash(VECTOR_ID, 0, b"abc 123")
    assert h == reference_hash(bytes.fromhex(VECTOR_ID), str(namespace).encode(), b"abc 123")


def test_message_hash_shape_and_case():
    h = crypto.message_hash(VECTOR_ID, 0, b"")
    assert len(h) == 43 and "=" not in h
    assert crypto.message_hash(VECTOR_ID.upper(), 0, b"") == h
    assert crypto.message_hash(VECTOR_ID, 0, b"abc 124") != crypto.message_hash(VECTOR_ID, 0, b"abc 123")


def test_message_hash_uses_the_id_prefix_byte():
    other = "03" + VECTOR_ID[2:]
    assert crypto.message_hash(other, 0, b"d") == reference_hash(bytes.fromhex(other), b"", b"d")
    assert crypto.message_hash(other, 0, b"d") != crypto.message_hash(VECTOR_ID, 0, b"d")


@pytest.mark.parametrize("bad", ["", VECTOR_ID[2:], VECTOR_ID[:-1] + "z", VECTOR_ID + "00"])
def test_message_hash_rejects_bad_ids(bad):
    with pytest.raises(BadSessionId):
        crypto.message_hash(bad, 0, b"x")


def test_message_hash_rejects_non_int_namespace():
    with pytest.raises(CryptoError):
        crypto.message_hash(VECTOR_ID, "1", b"x")  # type: ignore[arg-type]


# --- onion layers -------------------------------------------------------------

NODE = Identity.from_seed(b"\x07" * 32)
OTHER_NODE = Identity.from_seed(b"\x08" * 32)


def test_layer_keys_agree_and_match_the_formula():
    eph_pub, eph_sec = sodium.crypto_box_keypair()
    k_client = crypto.layer_key_client(eph_sec, NODE.x25519_public)
    k_node = crypto.layer_key_node(NODE.x25519_secret, eph_pub)
    shared = sodium.crypto_scalarmult(eph_sec, NODE.x25519_public)
    expected = hashlib.blake2b(shared + eph_pub + NODE.x25519_public, digest_size=32).digest()
    assert k_client == k_node == expected
    # The shortcuts (public keys passed in, not derived) give the same keys.
    assert crypto.layer_key_client(eph_sec, NODE.x25519_public, eph_pub) == expected
    assert crypto.layer_key_node(NODE.x25519_secret, eph_pub, NODE.x25519_public) == expected


def test_layer_round_trip_and_manual_decrypt():
    eph_pub, ct, key = crypto.seal_layer_keyed(b"layer", NODE.x25519_public)
    assert len(eph_pub) == 32 and len(ct) == 24 + len(b"layer") + 16
    assert sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(ct[24:], None, ct[:24], key) == b"layer"
    assert crypto.open_layer(ct, NODE.x25519_secret, eph_pub) == b"layer"
    eph_pub2, ct2 = crypto.seal_layer(b"layer", NODE.x25519_public)
    assert eph_pub2 != eph_pub and ct2[:24] != ct[:24]  # fresh key and nonce per layer


def test_reply_under_the_layer_key():
    eph_pub, ct, client_key = crypto.seal_layer_keyed(b"request", NODE.x25519_public)
    request, node_key = crypto.open_layer_keyed(ct, NODE.x25519_secret, eph_pub)
    assert request == b"request" and node_key == client_key
    reply = crypto.encrypt_with_key(node_key, b"response")
    assert crypto.decrypt_with_key(client_key, reply) == b"response"
    with pytest.raises(DecryptionError):
        crypto.decrypt_with_key(crypto.random_bytes(32), reply)


def test_layer_wrong_node_or_ephemeral_key():
    eph_pub, ct = crypto.seal_layer(b"x", NODE.x25519_public)
    with pytest.raises(DecryptionError):
        crypto.open_layer(ct, OTHER_NODE.x25519_secret, eph_pub)
    with pytest.raises(DecryptionError):
        crypto.open_layer(ct, NODE.x25519_secret, crypto.seal_layer(b"x", NODE.x25519_public)[0])


def test_layer_every_flipped_byte_is_rejected():
    eph_pub, ct = crypto.seal_layer(b"0123456789abcdef", NODE.x25519_public)
    for i in range(len(ct)):  # nonce, body and tag
        with pytest.raises(DecryptionError):
            crypto.open_layer(flip(ct, i), NODE.x25519_secret, eph_pub)
    for i in range(32):
        with pytest.raises(CryptoError):
            crypto.open_layer(ct, NODE.x25519_secret, flip(eph_pub, i))


def test_layer_truncations_are_rejected():
    eph_pub, ct = crypto.seal_layer(b"0123456789abcdef", NODE.x25519_public)
    for n in range(len(ct)):
        err = MalformedBlob if n < 40 else DecryptionError
        with pytest.raises(err):
            crypto.open_layer(ct[:n], NODE.x25519_secret, eph_pub)


def test_layer_bad_keys():
    with pytest.raises(BadKey):
        crypto.seal_layer(b"x", NODE.x25519_public[:31])
    with pytest.raises(BadKey, match="low-order"):
        crypto.seal_layer(b"x", bytes(32))
    _, ct = crypto.seal_layer(b"x", NODE.x25519_public)
    with pytest.raises(BadKey, match="low-order"):
        crypto.open_layer(ct, NODE.x25519_secret, bytes(32))
    with pytest.raises(BadKey):
        crypto.open_layer(ct, NODE.x25519_secret[:16], bytes(32))
    for n in (0, 16, 31, 33):
        with pytest.raises(BadKey):
            crypto.encrypt_with_key(bytes(n), b"x")
        with pytest.raises(BadKey):
            crypto.decrypt_with_key(bytes(n), bytes(64))


@FAST
@given(st.binary(max_size=2000))
def test_layer_property(plaintext):
    eph_pub, ct, key = crypto.seal_layer_keyed(plaintext, NODE.x25519_public)
    assert crypto.open_layer_keyed(ct, NODE.x25519_secret, eph_pub) == (plaintext, key)


@FAST
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=500))
def test_encrypt_with_key_property(key, plaintext):
    assert crypto.decrypt_with_key(key, crypto.encrypt_with_key(key, plaintext)) == plaintext


# --- request signatures -------------------------------------------------------

def test_signature_messages():
    assert crypto.retrieve_signature_message(0, 1700000000123) == b"retrieve1700000000123"
    assert crypto.retrieve_signature_message(42, 1700000000123) == b"retrieve421700000000123"
    assert crypto.retrieve_signature_message(-10, 5) == b"retrieve-105"
    assert crypto.delete_signature_message([]) == b"delete"
    assert crypto.delete_signature_message(["h1", "h+2/"]) == b"deleteh1h+2/"
    assert crypto.expire_signature_message(1700000060000, ["a", "b"]) == b"expire1700000060000ab"
    with pytest.raises(CryptoError):
        crypto.retrieve_signature_message(0, 1.5)  # type: ignore[arg-type]
    with pytest.raises(CryptoError):
        crypto.delete_signature_message("h1h2")  # type: ignore[arg-type]
    with pytest.raises(CryptoError):
        crypto.expire_signature_message(1, [b"h1"])  # type: ignore[list-item]


def test_sign_and_verify_request():
    msg = crypto.retrieve_signature_message(0, 1700000000123)
    sig = crypto.sign_request(ALICE, msg)
    crypto.verify_request(ALICE.ed25519_public, msg, sig)
    with pytest.raises(BadSignature):
        crypto.verify_request(BOB.ed25519_public, msg, sig)
    with pytest.raises(BadSignature):
        crypto.verify_request(ALICE.ed25519_public, crypto.retrieve_signature_message(0, 1700000000124), sig)
    for i in (0, 31, 32, 63):
        with pytest.raises(BadSignature):
            crypto.verify_request(ALICE.ed25519_public, msg, flip(sig, i))
    for n in (0, 1, 63, 65):
        with pytest.raises(BadSignature):
            crypto.verify_request(ALICE.ed25519_public, msg, (sig + b"\0")[:n])
    for n in (0, 31, 33):
        with pytest.raises(BadSignature):
            crypto.verify_request((ALICE.ed25519_public + b"\0")[:n], msg, sig)


def test_check_account():
    crypto.check_account(ALICE.session_id, ALICE.ed25519_public)
    crypto.check_account(ALICE.session_id.upper(), ALICE.ed25519_public)
    with pytest.raises(KeyMismatch):
        crypto.check_account(ALICE.session_id, BOB.ed25519_public)
    with pytest.raises(KeyMismatch):
        crypto.check_account(ALICE.session_id, ALICE.ed25519_public[:31])
    with pytest.raises(BadSessionId):
        crypto.check_account(ALICE.session_id[2:], ALICE.ed25519_public)


def test_every_error_is_a_crypto_error_and_not_a_pynacl_one():
    for cls in (BadKey, BadSessionId, BadSignature, KeyMismatch, DecryptionError, MalformedBlob):
        assert issubclass(cls, CryptoError)
        assert not issubclass(cls, nacl.exceptions.CryptoError)
    with pytest.raises(CryptoError) as info:
        crypto.open_message(BOB, b"\0" * 300)
    assert not isinstance(info.value, nacl.exceptions.CryptoError)


# --------------------------------------------------------------------------- seeded randomness (simulation)


def test_seeded_randomness_replays_every_ciphertext_and_real_runs_stay_random():
    import random

    alice = Identity.from_seed(bytes([7]) * 32)
    bob = Identity.from_seed(bytes([8]) * 32)

    def all_outputs(seed):
        rb = random.Random(seed).randbytes
        return (crypto.seal_message(alice, bob.session_id, b"hello", rb),
                crypto.seal_layer_keyed(b"layer", bob.x25519_public, rb),
                crypto.encrypt_with_key(bytes(32), b"reply", rb),
                Identity.generate(rb).ed25519_public)

    assert all_outputs(1) == all_outputs(1)
    assert all_outputs(1) != all_outputs(2)
    # The seeded sealed box is libsodium's: crypto_box_seal_open (inside open_message) opens it.
    sealed = all_outputs(3)[0]
    assert crypto.open_message(bob, sealed) == (b"hello", alice.session_id)
    eph, blob, key = all_outputs(3)[1]
    assert crypto.open_layer_keyed(blob, bob.x25519_secret, eph) == (b"layer", key)
    # Without a seeded source every call draws fresh randomness.
    assert crypto.seal_message(alice, bob.session_id, b"hi") != crypto.seal_message(alice, bob.session_id, b"hi")
    assert crypto.seal_layer(b"x", bob.x25519_public) != crypto.seal_layer(b"x", bob.x25519_public)


def test_one_signed_results_root_vouches_for_each_hash_and_no_other():
    from testnet.base import crypto as c

    member = c.Identity.from_seed(bytes([3]) * 32)
    key = member.ed25519_public.hex()
    for n in (1, 2, 3, 5, 8, 13):
        hashes = [f"h{i:042d}" for i in range(n)]
        root, paths = c.results_root(hashes)
        sig = c.sign_fast(member, c.store_result_message(key, root))
        assert sig == member.sign(c.store_result_message(key, root))
        for h, path in zip(hashes, paths):
            assert c.results_root_from(h, path) == root
            c.verify_request(member.ed25519_public, c.store_result_message(key, c.results_root_from(h, path)), sig)
        if n > 1:  # another hash on a member's path, or a path moved, leads elsewhere
            assert c.results_root_from("x" * 43, paths[0]) != root
            assert c.results_root_from(hashes[0], paths[1]) != root
    with pytest.raises(c.CryptoError):
        c.results_root_from("h", [b"\x02" + bytes(32)])
