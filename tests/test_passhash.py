"""elemta/passhash.py: the scrypt hashes of the AUTH password file."""

import pytest

from elemta import passhash as ph

# ---- hashes ------------------------------------------------------------------------------------


def test_hash_form_and_round_trip():
    text = ph.hash_password("correct horse")
    assert text.startswith(f"$scrypt$ln={ph.SCRYPT_LN},r={ph.SCRYPT_R},p={ph.SCRYPT_P}$")
    ln, r, p, salt, key = ph.parse_hash(text)
    assert (ln, r, p, len(salt), len(key)) == (14, 8, 1, ph.SALT_BYTES, ph.KEY_BYTES)
    assert ph.verify_hash(text, "correct horse")
    assert not ph.verify_hash(text, "correct horse ")
    assert not ph.verify_hash(text, "Correct horse")
    assert ph.hash_password("correct horse") != text  # a fresh salt each time


def test_the_parameters_are_read_from_the_hash():
    cheap = ph.hash_password("pässwörd", ln=10, r=4, p=2)
    assert cheap.startswith("$scrypt$ln=10,r=4,p=2$")
    assert ph.verify_hash(cheap, "pässwörd") and not ph.verify_hash(cheap, "passwörd")
    # The same salt and password under other parameters is another key.
    _, _, _, salt, key = ph.parse_hash(cheap)
    assert ph.parse_hash(ph.hash_password("pässwörd", ln=11, r=4, p=2, salt=salt))[4] != key


@pytest.mark.parametrize(("text", "why"), [
    ("", "is not \\$scrypt"),
    ("$2b$12$abcdefghijklmnopqrstuv", "is not \\$scrypt"),
    ("$scrypt$ln=14,r=8$c2FsdA==$a2V5a2V5a2V5a2V5a2V5a2V5", "is not \\$scrypt"),
    ("$scrypt$ln=30,r=8,p=1$c2FsdA==$a2V5a2V5a2V5a2V5a2V5a2V5", "out of range"),
    ("$scrypt$ln=20,r=64,p=1$c2FsdA==$a2V5a2V5a2V5a2V5a2V5a2V5", "out of range"),
    ("$scrypt$ln=0,r=8,p=1$c2FsdA==$a2V5a2V5a2V5a2V5a2V5a2V5", "out of range"),
    ("$scrypt$ln=14,r=8,p=1$c2FsdA=$a2V5a2V5a2V5a2V5a2V5a2V5", "not base64"),
    ("$scrypt$ln=14,r=8,p=1$c2FsdA==$a2V5", "shorter than 16"),
])
def test_bad_hashes(text, why):
    with pytest.raises(ValueError, match=why):
        ph.parse_hash(text)


