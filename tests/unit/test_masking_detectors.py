"""Detectors: valid values are found (exact spans), look-alikes that fail validation are not."""
import pytest

from enforcer.masking.detectors import BUILTIN, Scanner, custom_detector, iban_valid, luhn_valid, ssn_valid


def found(names, text):
    scanner = Scanner([BUILTIN[n] for n in names])
    return [(text[s:e], d.name) for s, e, d in scanner.find(text)]


@pytest.mark.parametrize("card", ["4111111111111111", "4111 1111 1111 1111", "4111-1111-1111-1111",
                                  "5555555555554444", "378282246310005", "3782 822463 10005",
                                  "6011111111111117", "4012888888881881", "2223003122003222"])
def test_valid_card_numbers_are_found_with_common_separators(card):
    assert found(["card"], f"paid with {card}, thanks") == [(card, "card")]


@pytest.mark.parametrize("text", ["4111111111111112", "1234567812345678", "order 41111111111",
                                  "41111111111111111111111", "9111111111111111 (bad prefix)",
                                  "4111 1111 1111 1112"])
def test_card_look_alikes_are_not_found(text):
    assert found(["card"], text) == []


def test_card_inside_a_longer_digit_group_run_is_still_found():
    assert found(["card"], "ref 12 31 4111 1111 1111 1111") == [("4111 1111 1111 1111", "card")]
    assert found(["card"], "1 4111 1111 1111 1111") == [("4111 1111 1111 1111", "card")]


def test_luhn():
    assert luhn_valid("79927398713")
    assert not luhn_valid("79927398710")


@pytest.mark.parametrize("ssn", ["123-45-6789", "078-05-1120", "123 45 6789", "899-99-9999"])
def test_valid_ssns_are_found(ssn):
    assert found(["ssn"], f"ssn: {ssn}.") == [(ssn, "ssn")]


@pytest.mark.parametrize("ssn", ["000-12-3456", "666-12-3456", "900-12-3456", "999-12-3456", "123-00-4567",
                                 "123-45-0000", "123-45-67890", "1123-45-6789", "123-45 6789"])
def test_invalid_ssn_ranges_and_shapes_are_not_found(ssn):
    assert found(["ssn"], f"ssn: {ssn}") == []


def test_ssn_validator_ranges():
    assert ssn_valid("123", "45", "6789")
    assert not ssn_valid("666", "45", "6789")


def test_ssn_found_next_to_a_card_number_the_card_regex_ran_over():
    text = "SSN 123-45-6789 4111 1111 1111 1111"
    assert found(["card", "ssn"], text) == [("123-45-6789", "ssn"), ("4111 1111 1111 1111", "card")]


def test_email():
    assert found(["email"], "mail jane.doe+x@mail.example.co.uk now") == [("jane.doe+x@mail.example.co.uk", "email")]
    assert found(["email"], "user@localhost and @handle") == []


@pytest.mark.parametrize("phone", ["+1 415 555 2671", "(415) 555-2671", "415-555-2671", "+44 20 7946 0958"])
def test_phone(phone):
    assert found(["phone"], f"call {phone} today") == [(phone, "phone")]


def test_phone_rejects_short_numbers():
    assert found(["phone"], "room 555-2671") == []


@pytest.mark.parametrize("iban", ["GB82 WEST 1234 5698 7654 32", "GB82WEST12345698765432", "DE89370400440532013000",
                                  "FR1420041010050500013M02606"])
def test_valid_ibans(iban):
    assert found(["iban"], f"iban {iban} ok") == [(iban, "iban")]


def test_invalid_iban_checksum():
    assert not iban_valid("GB82WEST12345698765433")
    assert found(["iban"], "iban GB82WEST12345698765433") == []


def test_aws_keys():
    text = "AKIAIOSFODNN7EXAMPLE / wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    assert found(["aws_access_key_id", "aws_secret_key"], text) == [
        ("AKIAIOSFODNN7EXAMPLE", "aws_access_key_id"), ("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws_secret_key")]
    # a hex SHA-1 is 40 characters too, but not a secret key
    assert found(["aws_secret_key"], "commit 356a192b7913b04c54574d18c28d46e6395428ab") == []
    assert found(["aws_access_key_id"], "AKIAIOSFODNN7EXAMPLEX") == []


JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
       "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U")


def test_jwt_and_bearer_tokens():
    assert found(["jwt"], f"token={JWT}&x=1") == [(JWT, "jwt")]
    assert found(["bearer"], "Authorization: Bearer abc123DEF456ghi789") == [("abc123DEF456ghi789", "bearer")]
    assert found(["bearer"], "the bearer of bad news") == []


def test_custom_regex_detector():
    d = custom_detector("employee_id", r"EMP-[0-9]{6}")
    assert [(m[0], m[1]) for m in [(s, e) for s, e, _ in Scanner([d]).find("by EMP-004211 and EMP-1")]] == [(3, 13)]
    with pytest.raises(ValueError):
        custom_detector("bad", r"(a)\1")


def test_text_without_hints_costs_no_regex_and_finds_nothing():
    scanner = Scanner(BUILTIN.values())
    assert scanner.find("Jane Doe, 12 Main Street, Springfield") == []
    assert scanner._combined == {} or all(len(k) < len(BUILTIN) for k in scanner._combined)
