"""IMEI handling (3GPP TS 23.003 §6.2).

An IMEI is TAC (8 digits) + SNR (6) + a check digit; an IMEISV is TAC + SNR + SVN (2).
Every list and every request is keyed by the 14-digit TAC+SNR: the 15th digit on the wire is a
spare "0" sent by handsets, not a check digit, so it is never Luhn-checked, and a 16th means
an IMEISV whose SVN does not identify the equipment.
"""

TAC_LENGTH = 8
IMEI_KEY_LENGTH = 14


IMSI_LENGTHS = range(5, 16)  # 5 to 15 digits: what every list, S13 and N5g-eir accept


def is_imsi(text: str) -> bool:
    """An IMSI as open EIR takes one: 5 to 15 ASCII digits (TS 23.003 §2.2: at most 15)."""
    return text.isascii() and text.isdigit() and len(text) in IMSI_LENGTHS


class ImeiError(ValueError):
    """Not an IMEI: the message says what is wrong with it."""


def normalise_imei(text: str) -> str:
    """The 14-digit TAC+SNR of a 14, 15 or 16 digit IMEI/IMEISV."""
    if not text.isascii() or not text.isdigit():
        raise ImeiError(f"{text!r} is not all digits")
    if not 14 <= len(text) <= 16:
        raise ImeiError(f"{text!r} has {len(text)} digits, an IMEI has 14 to 16")
    return text[:IMEI_KEY_LENGTH]


def is_tac(text: str) -> bool:
    return len(text) == TAC_LENGTH and text.isascii() and text.isdigit()


def luhn_check_digit(imei14: str) -> str:
    """The check digit of a 14-digit TAC+SNR, for printing a full 15-digit IMEI."""
    total = 0
    for index, char in enumerate(imei14):
        digit = int(char)
        if index % 2:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return str((10 - total % 10) % 10)
