"""The credential file shared with Qwen Code: parsing, loading, saving, change detection, the lock."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import os
import re
import signal
import stat
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qwenproxy
from qwenproxy import store as store_module
from qwenproxy.profile import QWEN
from qwenproxy.store import (
    CredentialError,
    Credentials,
    CredentialStore,
    LockTimeout,
    UnsafeFileError,
    mask,
    parse_credentials,
    resolve_home,
)

KNOWN_FIELDS = ("access_token", "token_type", "refresh_token", "resource_url", "expiry_date")
ACCESS = "Xq7dKp2LmN9vR4sT1wY6zA3bC8eF5gH0jI2kM4nO6pQ8rS0tU"
REFRESH = "Rf3sH8kL1mN6pQ9tV2wX5yZ0aB4cD7eF1gH3jK5lM7nP9qR"
# What Qwen Code 0.24.4 writes: JSON.stringify(credentials, null, 2), no trailing newline.
QWEN_CODE_FILE = f"""{{
  "access_token": "{ACCESS}",
  "token_type": "Bearer",
  "refresh_token": "{REFRESH}",
  "resource_url": "portal.qwen.ai",
  "expiry_date": 1764860000123
}}"""
WORKER = Path(__file__).parent / "helpers" / "lock_worker.py"
PACKAGE_DIR = Path(qwenproxy.__file__).parent.parent


def creds(**changes) -> Credentials:
    fields = dict(
        access_token=ACCESS,
        refresh_token=REFRESH,
        token_type="Bearer",
        expiry_date=1764860000123,
        resource_url="portal.qwen.ai",
    )
    fields.update(changes)
    return Credentials(**fields)


def valid_obj(**changes) -> dict:
    """A valid credential object with `changes`; a change to `...` removes the field."""
    obj = creds().to_json()
    obj.update(changes)
    return {k: v for k, v in obj.items() if v is not ...}


def qwen_code_accepts(raw: bytes) -> bool:
    """Qwen Code's test of a credential file, restated: parses as JSON, three non-empty strings
    and a number."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return False
    return (
        isinstance(obj, dict)
        and all(
            isinstance(obj.get(k), str) and obj[k] for k in ("access_token", "refresh_token", "token_type")
        )
        and isinstance(obj.get("expiry_date"), (int, float))
        and not isinstance(obj.get("expiry_date"), bool)
        and obj["expiry_date"] != 0
    )


def write_as_other_process(path: Path, content: bytes | str) -> None:
    """Replace the file as Qwen Code would (temp file + rename), with a clearly later mtime so the
    test does not depend on the file system's timestamp granularity."""
    old_mtime_ns = path.stat().st_mtime_ns if path.exists() else time.time_ns()
    tmp = path.with_name("other-writer.tmp")
    tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    os.replace(tmp, path)
    later = old_mtime_ns + 10_000_000_000
    os.utime(path, ns=(later, later))


def files_in(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- parsing -------------------------------------------------------------------------------------


def test_parse_reads_a_file_as_qwen_code_writes_it():
    c = parse_credentials(QWEN_CODE_FILE.encode())
    assert c == Credentials(
        access_token=ACCESS,
        refresh_token=REFRESH,
        token_type="Bearer",
        expiry_date=1764860000123,
        resource_url="portal.qwen.ai",
    )
    assert c.extra == {}


def test_to_json_round_trips_through_parse_in_qwen_code_field_order():
    c = creds(extra={"scope": "openid", "nested": {"a": [1, 2]}})
    out = c.to_json()
    assert list(out) == [*KNOWN_FIELDS, "scope", "nested"]
    assert parse_credentials(json.dumps(out)) == c


def test_to_json_omits_resource_url_when_none():
    out = creds(resource_url=None).to_json()
    assert "resource_url" not in out
    assert list(out) == ["access_token", "token_type", "refresh_token", "expiry_date"]


def test_resource_url_may_be_null_or_absent():
    assert parse_credentials(json.dumps(valid_obj(resource_url=None))).resource_url is None
    assert parse_credentials(json.dumps(valid_obj(resource_url=...))).resource_url is None


@pytest.mark.parametrize("name", ["access_token", "refresh_token", "token_type", "expiry_date"])
def test_a_missing_required_field_is_named(name):
    with pytest.raises(CredentialError, match=rf"^oauth_creds\.json: field {name} is missing$"):
        parse_credentials(json.dumps(valid_obj(**{name: ...})))


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("access_token", 12, "must be a string, got number"),
        ("access_token", None, "must be a string, got null"),
        ("refresh_token", ["x"], "must be a string, got array"),
        ("token_type", {"a": 1}, "must be a string, got object"),
        ("token_type", True, "must be a string, got boolean"),
        ("expiry_date", "1764860000123", "must be a number, got string"),
        ("expiry_date", None, "must be a number, got null"),
        ("expiry_date", True, "must be a number, got boolean"),
        ("expiry_date", False, "must be a number, got boolean"),
        ("resource_url", 5, "must be a string or null, got number"),
    ],
)
def test_a_field_of_the_wrong_type_is_named_with_both_types(name, value, expected):
    with pytest.raises(CredentialError) as e:
        parse_credentials(json.dumps(valid_obj(**{name: value})))
    assert str(e.value) == f"oauth_creds.json: field {name} {expected}"


@pytest.mark.parametrize("name", ["access_token", "refresh_token", "token_type"])
@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_token_field_is_rejected(name, value):
    with pytest.raises(CredentialError, match=rf"field {name} is empty"):
        parse_credentials(json.dumps(valid_obj(**{name: value})))


@pytest.mark.parametrize("name", ["access_token", "token_type"])
def test_header_fields_with_control_characters_are_rejected(name):
    # They are sent as an HTTP header; a CR/LF in one would inject headers.
    with pytest.raises(CredentialError, match=rf"field {name} contains control characters"):
        parse_credentials(json.dumps(valid_obj(**{name: "abc\r\nX-Evil: 1"})))


def test_every_problem_is_reported_at_once():
    with pytest.raises(CredentialError) as e:
        parse_credentials('{"access_token": "", "expiry_date": "soon"}')
    assert str(e.value) == (
        "oauth_creds.json: field access_token is empty; field refresh_token is missing; "
        "field token_type is missing; field expiry_date must be a number, got string"
    )


@pytest.mark.parametrize("content", [b"", b"  \n\t", ""])
def test_an_empty_file_says_so(content):
    with pytest.raises(CredentialError, match=r"^oauth_creds\.json: file is empty$"):
        parse_credentials(content)


@pytest.mark.parametrize("cut", [1, 10, 50, -30, -2, -1])
def test_a_truncated_file_says_so(cut):
    with pytest.raises(CredentialError, match=r"JSON ends early \(truncated file\?\)"):
        parse_credentials(QWEN_CODE_FILE[:cut])


def test_invalid_json_gives_its_position():
    with pytest.raises(CredentialError, match=r"not valid JSON: .* at line 2 column 3"):
        parse_credentials('{\n  access_token: "x"\n}')


@pytest.mark.parametrize(
    ("content", "kind"),
    [("[]", "array"), ('"x"', "string"), ("42", "number"), ("null", "null"), ("true", "boolean")],
)
def test_the_top_level_must_be_an_object(content, kind):
    with pytest.raises(CredentialError, match=rf"top level must be a JSON object, got {kind}$"):
        parse_credentials(content)


def test_a_file_of_nul_bytes_is_recognised():
    with pytest.raises(CredentialError, match="only NUL bytes"):
        parse_credentials(b"\x00" * 180)


def test_nul_bytes_after_the_json_are_rejected():
    with pytest.raises(CredentialError, match="not valid JSON"):
        parse_credentials(QWEN_CODE_FILE.encode() + b"\x00\x00\x00")


def test_bytes_that_are_not_utf8_are_rejected():
    with pytest.raises(CredentialError, match=r"not UTF-8 text \(bad byte at offset 1\)"):
        parse_credentials(b"{\xff}")


def test_a_utf8_byte_order_mark_is_tolerated():
    assert parse_credentials(b"\xef\xbb\xbf" + QWEN_CODE_FILE.encode()).access_token == ACCESS


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_json_number_constants_are_rejected(constant):
    with pytest.raises(CredentialError, match=f"{constant} is not valid JSON"):
        parse_credentials(QWEN_CODE_FILE.replace("1764860000123", constant))


@pytest.mark.parametrize("number", ["1e400", "-1e400", "9007199254740993", "1e300"])
def test_expiry_dates_out_of_range_are_rejected(number):
    with pytest.raises(CredentialError, match="field expiry_date"):
        parse_credentials(QWEN_CODE_FILE.replace("1764860000123", number))


@pytest.mark.parametrize(
    ("number", "expected"),
    [("1764860000123", 1764860000123), ("1764860000123.9", 1764860000123), ("1.7e12", 1700000000000)],
)
def test_expiry_date_may_be_an_int_or_a_float_and_becomes_whole_ms(number, expected):
    c = parse_credentials(QWEN_CODE_FILE.replace("1764860000123", number))
    assert c.expiry_date == expected
    assert type(c.expiry_date) is int


def test_the_source_names_the_file_in_errors():
    with pytest.raises(CredentialError, match=r"^/home/u/\.qwen/oauth_creds\.json: file is empty$"):
        parse_credentials(b"", source="/home/u/.qwen/oauth_creds.json")


def test_unknown_fields_are_kept_in_extra():
    c = parse_credentials(json.dumps(valid_obj(scope="openid", id_token="secret-id-token")))
    assert c.extra == {"scope": "openid", "id_token": "secret-id-token"}


def test_constructing_invalid_credentials_fails_like_parsing():
    with pytest.raises(CredentialError, match="field access_token is empty"):
        creds(access_token="")
    with pytest.raises(CredentialError, match="field expiry_date must be a number, got boolean"):
        creds(expiry_date=True)
    with pytest.raises(CredentialError, match="extra fields repeat known fields: access_token"):
        creds(extra={"access_token": "other"})


def test_extra_is_a_private_copy():
    extra = {"scope": "openid"}
    c = creds(extra=extra)
    extra["scope"] = "changed"
    assert c.extra == {"scope": "openid"}


def test_credentials_are_hashable_and_compare_by_value():
    assert creds() == creds()
    assert hash(creds(extra={"a": 1})) == hash(creds(extra={"a": 1}))
    assert creds() != creds(access_token="other-token")


# --- pure behaviour of Credentials -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource_url", "expected"),
    [
        ("portal.qwen.ai", "https://portal.qwen.ai/v1"),
        ("https://portal.qwen.ai", "https://portal.qwen.ai/v1"),
        ("https://portal.qwen.ai/", "https://portal.qwen.ai/v1"),
        ("https://x/v1", "https://x/v1"),
        ("x/v1/", "https://x/v1"),
        ("http://localhost:8080", "http://localhost:8080/v1"),
        (None, QWEN.default_api_base),
        ("", QWEN.default_api_base),
        ("  ", QWEN.default_api_base),
    ],
)
def test_api_base_follows_qwen_code(resource_url, expected):
    assert creds(resource_url=resource_url).api_base() == expected


def test_api_base_uses_the_given_default():
    assert creds(resource_url=None).api_base("http://127.0.0.1:9/v1") == "http://127.0.0.1:9/v1"


def test_a_token_is_usable_until_the_buffer_before_expiry():
    c = creds(expiry_date=1_000_000)  # 1000 s after the epoch
    assert c.expires_at == 1000.0
    assert c.is_usable(969.999)
    assert not c.is_usable(970.0)  # 30 s buffer, as Qwen Code
    assert c.is_usable(999.0, buffer_s=0)
    assert not c.is_usable(1000.0, buffer_s=0)


@pytest.mark.parametrize(
    ("token", "shown"),
    [
        ("a" * 43, "aaaa…(43 chars)"),
        ("abcdefghijklmnop", "abcd…(16 chars)"),
        ("abcdefghijklmno", "…(15 chars)"),
        ("x", "…(1 char)"),
        ("", "…(0 chars)"),
    ],
)
def test_mask_shows_at_most_four_characters_and_the_length(token, shown):
    assert mask(token) == shown


def test_repr_and_str_do_not_show_tokens():
    c = creds(extra={"id_token": "the-secret-id-token-value"})
    for text in (repr(c), str(c), c.redacted(), f"{c}", repr([c])):
        assert ACCESS not in text and REFRESH not in text
        assert "the-secret-id-token-value" not in text
        assert ACCESS[:4] + "…" in text and "id_token" in text


# --- property tests -----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
# Objects that look like credential files, each known field present or not, with any value.
credential_like = st.fixed_dictionaries(
    {},
    optional={
        "access_token": json_values | st.text(),
        "refresh_token": json_values | st.text(),
        "token_type": json_values | st.just("Bearer"),
        "resource_url": json_values,
        "expiry_date": json_values | st.integers() | st.floats(),
    },
).flatmap(lambda d: st.dictionaries(st.text(), json_values, max_size=2).map(lambda e: {**e, **d}))


def _parse_or_error(data):
    try:
        return parse_credentials(data)
    except CredentialError as e:
        assert str(e).startswith("oauth_creds.json: ")
        return None


@given(json_values | credential_like)
def test_any_json_value_parses_or_raises_credential_error(value):
    c = _parse_or_error(json.dumps(value))
    if c is not None:
        assert qwen_code_accepts(json.dumps(c.to_json()).encode())


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_credential_error(data):
    _parse_or_error(data)


@given(st.text(max_size=300))
def test_any_text_parses_or_raises_credential_error(text):
    _parse_or_error(text)


def _token(**kw):
    return st.text(min_size=1, **kw).filter(lambda s: s.strip() and not re.search(r"[\x00-\x1f\x7f]", s))


valid_credentials = st.builds(
    Credentials,
    access_token=_token(),
    refresh_token=st.text(min_size=1).filter(str.strip),
    token_type=_token(),
    expiry_date=(st.integers(-(2**53), 2**53) | st.floats(-(2**52), 2**52)).filter(lambda v: int(v) != 0),
    resource_url=st.none() | st.text(),
    extra=st.dictionaries(st.text().filter(lambda k: k not in KNOWN_FIELDS), json_values, max_size=3),
)


@given(valid_credentials)
def test_any_valid_credentials_round_trip_through_json(c):
    assert parse_credentials(json.dumps(c.to_json(), indent=2)) == c


@given(valid_credentials)
@settings(max_examples=25, deadline=None)
def test_any_valid_credentials_round_trip_through_the_file(c):
    with tempfile.TemporaryDirectory() as home:
        s = CredentialStore(Path(home) / "q")
        s.save(c)
        assert qwen_code_accepts(s.path.read_bytes())
        assert CredentialStore(s.home).load() == c


# Upper-case letters only, 12 or more: such a token cannot occur in the repr by accident.
token_like = st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ", min_size=12)


@given(token_like, token_like)
def test_repr_never_contains_a_whole_token(access, refresh):
    c = creds(access_token=access, refresh_token=refresh)
    assert access not in repr(c) and refresh not in repr(c)


@given(st.text(alphabet=st.characters(categories=["L", "N"]), min_size=6))
def test_mask_never_contains_the_whole_token(token):
    assert token not in mask(token)


# --- resolve_home ---------------------------------------------------------------------------------------


def test_home_explicit_wins_and_expands_the_user(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_home("~/elsewhere", env={"QWEN_HOME": "/env"}) == tmp_path / "elsewhere"


def test_home_from_qwen_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_home(None, env={"QWEN_HOME": "/srv/qwen"}) == Path("/srv/qwen")
    assert resolve_home(None, env={"QWEN_HOME": "~/q"}) == tmp_path / "q"


def test_home_defaults_to_dot_qwen(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_home(None, env={}) == tmp_path / ".qwen"
    assert resolve_home(None, env={"QWEN_HOME": ""}) == tmp_path / ".qwen"


# --- save -------------------------------------------------------------------------------------------------


def test_save_creates_the_directory_0700_and_the_file_0600(tmp_path):
    s = CredentialStore(tmp_path / "missing" / ".qwen")
    s.save(creds())
    assert stat.S_IMODE(s.home.stat().st_mode) == 0o700
    assert stat.S_IMODE(s.path.stat().st_mode) == 0o600
    assert files_in(s.home) == ["oauth_creds.json"]


def test_save_gives_exact_modes_whatever_the_umask(tmp_path):
    old = os.umask(0o277)
    try:
        s = CredentialStore(tmp_path / ".qwen")
        s.save(creds())
    finally:
        os.umask(old)
    assert stat.S_IMODE(s.home.stat().st_mode) == 0o700
    assert stat.S_IMODE(s.path.stat().st_mode) == 0o600


def test_save_leaves_an_existing_directory_mode_alone(tmp_path):
    home = tmp_path / ".qwen"
    home.mkdir()
    home.chmod(0o750)
    CredentialStore(home).save(creds())
    assert stat.S_IMODE(home.stat().st_mode) == 0o750


def test_save_writes_what_qwen_code_writes(tmp_path):
    s = CredentialStore(tmp_path)
    s.save(parse_credentials(QWEN_CODE_FILE))
    raw = s.path.read_bytes()
    assert raw.decode() == QWEN_CODE_FILE
    assert qwen_code_accepts(raw)


def test_save_preserves_unknown_fields(tmp_path):
    s = CredentialStore(tmp_path)
    s.path.write_text(json.dumps(valid_obj(scope="openid model.completion", other={"k": [1]})))
    s.save(s.load())
    saved = json.loads(s.path.read_text())
    assert saved["scope"] == "openid model.completion" and saved["other"] == {"k": [1]}


def test_save_replaces_through_a_temp_file_in_the_same_directory(tmp_path, monkeypatch):
    s = CredentialStore(tmp_path)
    s.save(creds(access_token="old-token"))
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((Path(src), Path(dst), stat.S_IMODE(os.stat(src).st_mode)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    s.save(creds(access_token="new-token"))
    [(src, dst, mode)] = replaced
    assert dst == s.path and src.parent == s.path.parent and src != dst
    assert mode == 0o600
    assert files_in(tmp_path) == ["oauth_creds.json"]
    assert s.load().access_token == "new-token"


@pytest.mark.parametrize("failing", ["fsync", "replace", "write"])
def test_a_failed_save_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch, failing):
    s = CredentialStore(tmp_path)
    s.save(creds(access_token="old-token"))
    before = s.path.read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, failing, no_space)
    with pytest.raises(OSError) as e:
        s.save(creds(access_token="new-token"))
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC
    assert s.path.read_bytes() == before
    assert files_in(tmp_path) == ["oauth_creds.json"]


def test_save_moves_a_corrupt_file_aside_byte_for_byte(tmp_path, caplog):
    s = CredentialStore(tmp_path)
    garbage = b'{"access_token": "half-writt\x00\xff'
    s.path.write_bytes(garbage)
    s.save(creds())
    [aside] = [p for p in tmp_path.iterdir() if p != s.path]
    assert re.fullmatch(r"oauth_creds\.json\.corrupt-\d{8}T\d{6}Z", aside.name)
    assert aside.read_bytes() == garbage
    assert s.load() == creds()
    assert str(aside) in caplog.text


def test_save_moves_an_unreadable_file_aside_rather_than_overwrite_it(tmp_path, monkeypatch):
    s = CredentialStore(tmp_path)
    s.path.write_text("something the user keeps")
    real_open = os.open

    def denied(path, flags, *args):
        if Path(path) == s.path and not flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", denied)
    s.save(creds())
    monkeypatch.undo()
    [aside] = [p for p in tmp_path.iterdir() if p != s.path]
    assert aside.read_text() == "something the user keeps"


def test_save_overwrites_a_valid_file_without_moving_it_aside(tmp_path):
    s = CredentialStore(tmp_path)
    s.save(creds(access_token="first-token"))
    s.save(creds(access_token="second-token"))
    assert files_in(tmp_path) == ["oauth_creds.json"]


def test_set_aside_never_overwrites_an_earlier_aside_file(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "_utc_stamp", lambda: "20260101T000000Z")
    s = CredentialStore(tmp_path)
    names = []
    for content in (b"first", b"second", b"third"):
        s.path.write_bytes(content)
        names.append(s.set_aside())
    assert [p.name for p in names] == [
        "oauth_creds.json.corrupt-20260101T000000Z",
        "oauth_creds.json.corrupt-20260101T000000Z-1",
        "oauth_creds.json.corrupt-20260101T000000Z-2",
    ]
    assert [p.read_bytes() for p in names] == [b"first", b"second", b"third"]
    assert not s.path.exists()


def test_set_aside_without_a_file_does_nothing(tmp_path):
    assert CredentialStore(tmp_path).set_aside() is None
    assert CredentialStore(tmp_path / "missing").set_aside() is None


def test_save_refuses_to_write_through_a_symlink(tmp_path):
    target = tmp_path / "dotfiles" / "creds.json"
    target.parent.mkdir()
    target.write_text(QWEN_CODE_FILE)
    s = CredentialStore(tmp_path / ".qwen")
    s.home.mkdir()
    s.path.symlink_to(target)
    with pytest.raises(UnsafeFileError, match="is a symbolic link .*not replacing it"):
        s.save(creds(access_token="new-token"))
    assert target.read_text() == QWEN_CODE_FILE
    assert s.path.is_symlink()
    assert files_in(s.home) == ["oauth_creds.json"]
    # Reading through the link is fine.
    assert s.load().access_token == ACCESS


def test_save_refuses_to_replace_a_directory(tmp_path):
    s = CredentialStore(tmp_path)
    s.path.mkdir()
    (s.path / "keep").write_text("x")
    with pytest.raises(UnsafeFileError, match="is a directory"):
        s.save(creds())
    assert (s.path / "keep").read_text() == "x"


def test_save_refuses_credentials_that_cannot_be_written_before_touching_the_file(tmp_path):
    s = CredentialStore(tmp_path)
    s.save(creds())
    before = s.path.read_bytes()
    with pytest.raises(ValueError):
        s.save(creds(extra={"bad": math.nan}))
    assert s.path.read_bytes() == before
    assert files_in(tmp_path) == ["oauth_creds.json"]


def test_delete_removes_the_file_and_says_whether_there_was_one(tmp_path):
    clock = FakeClock()
    s = CredentialStore(tmp_path, clock=clock)
    s.save(creds())
    assert s.delete() is True
    assert files_in(tmp_path) == []
    clock.now += 5
    assert not s.changed()  # our own removal
    assert s.delete() is False
    assert CredentialStore(tmp_path / "missing").delete() is False


def test_delete_removes_a_symlink_but_not_its_target(tmp_path):
    target = tmp_path / "elsewhere.json"
    target.write_text(QWEN_CODE_FILE)
    s = CredentialStore(tmp_path / ".qwen")
    s.home.mkdir()
    s.path.symlink_to(target)
    assert s.delete() is True
    assert not os.path.lexists(s.path)
    assert target.read_text() == QWEN_CODE_FILE


def test_delete_refuses_a_directory(tmp_path):
    s = CredentialStore(tmp_path)
    s.path.mkdir()
    with pytest.raises(UnsafeFileError, match="is a directory"):
        s.delete()
    assert s.path.is_dir()


async def test_save_async_and_load_async(tmp_path):
    s = CredentialStore(tmp_path)
    await s.save_async(creds())
    assert await s.load_async() == creds()


# --- load ----------------------------------------------------------------------------------------------


def test_load_without_a_file_gives_none_and_no_problem(tmp_path):
    for home in (tmp_path, tmp_path / "no" / "such" / "dir"):
        s = CredentialStore(home)
        assert s.load() is None
        assert s.problem is None


def test_load_of_a_corrupt_file_gives_none_and_the_reason(tmp_path):
    s = CredentialStore(tmp_path)
    s.path.write_text('{"access_token": "x"}')
    assert s.load() is None
    assert s.problem == (
        f"{s.path}: field refresh_token is missing; field token_type is missing; field expiry_date is missing"
    )


def test_a_good_load_clears_the_problem(tmp_path):
    s = CredentialStore(tmp_path)
    s.path.write_text("{")
    s.load()
    assert s.problem
    write_as_other_process(s.path, QWEN_CODE_FILE)
    assert s.load().access_token == ACCESS
    assert s.problem is None


def test_a_corrupt_file_is_logged_once_per_version(tmp_path, caplog):
    s = CredentialStore(tmp_path)
    s.path.write_text("[]")
    with caplog.at_level(logging.WARNING, logger="qwenproxy.store"):
        s.load()
        s.load()
        assert len(caplog.records) == 1
        write_as_other_process(s.path, "{")
        s.load()
        s.load()
    assert len(caplog.records) == 2
    assert "got array" in caplog.records[0].getMessage()
    assert "truncated" in caplog.records[1].getMessage()


def test_a_directory_in_place_of_the_file_is_a_problem(tmp_path):
    s = CredentialStore(tmp_path)
    s.path.mkdir()
    assert s.load() is None
    assert s.problem == f"{s.path} is a directory, not a credential file"


def test_a_named_pipe_in_place_of_the_file_does_not_hang(tmp_path):
    s = CredentialStore(tmp_path)
    os.mkfifo(s.path)
    assert s.load() is None
    assert "named pipe" in s.problem


def test_a_home_that_is_a_file_is_a_problem(tmp_path):
    (tmp_path / "file").write_text("")
    s = CredentialStore(tmp_path / "file")
    assert s.load() is None
    assert s.problem == f"{s.home} is not a directory"


def test_a_huge_file_is_not_read_whole(tmp_path):
    s = CredentialStore(tmp_path)
    s.path.write_bytes(b" " * (2 << 20))
    assert s.load() is None
    assert "too large" in s.problem


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway; see the next test")
def test_an_unreadable_file_is_a_problem(tmp_path):
    s = CredentialStore(tmp_path)
    s.path.write_text(QWEN_CODE_FILE)
    s.path.chmod(0)
    assert s.load() is None
    assert s.problem == f"{s.path}: cannot read it: Permission denied"


def test_an_unreadable_file_is_a_problem_even_as_root(tmp_path, monkeypatch):
    # As root, chmod 000 does not stop reading, so the refusal comes from a patched os.open.
    s = CredentialStore(tmp_path)
    s.path.write_text(QWEN_CODE_FILE)
    real_open = os.open

    def denied(path, flags, *args):
        if Path(path) == s.path:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", denied)
    assert s.load() is None
    assert s.problem == f"{s.path}: cannot read it: Permission denied"


# --- changed() --------------------------------------------------------------------------------------------


def test_changed_is_true_before_the_first_load(tmp_path):
    assert CredentialStore(tmp_path).changed()


def test_changed_sees_another_writer_replace_the_file(tmp_path):
    clock = FakeClock()
    s = CredentialStore(tmp_path, clock=clock)
    s.save(creds(access_token="ours"))
    assert not s.changed()
    write_as_other_process(s.path, json.dumps(valid_obj(access_token="theirs")))
    clock.now += QWEN.file_check_interval_s
    assert s.changed()
    assert s.load().access_token == "theirs"
    clock.now += QWEN.file_check_interval_s
    assert not s.changed()


def test_changed_sees_an_in_place_rewrite_of_the_same_size(tmp_path):
    clock = FakeClock()
    s = CredentialStore(tmp_path, clock=clock)
    s.save(creds(access_token="aaaa"))
    s.load()
    content = s.path.read_text().replace("aaaa", "bbbb")
    st_before = s.path.stat()
    with open(s.path, "r+") as f:
        f.write(content)
    later = st_before.st_mtime_ns + 10_000_000_000
    os.utime(s.path, ns=(later, later))
    assert s.path.stat().st_ino == st_before.st_ino and s.path.stat().st_size == st_before.st_size
    clock.now += 5
    assert s.changed()


def test_changed_sees_the_file_appear_and_disappear(tmp_path):
    clock = FakeClock()
    s = CredentialStore(tmp_path, clock=clock)
    assert s.load() is None
    assert not s.changed()
    clock.now += 5
    write_as_other_process(s.path, QWEN_CODE_FILE)
    assert s.changed()
    s.load()
    os.unlink(s.path)
    clock.now += 5
    assert s.changed()
    s.load()
    clock.now += 5
    assert not s.changed()


def test_changed_stats_at_most_once_per_interval(tmp_path, monkeypatch):
    clock = FakeClock()
    s = CredentialStore(tmp_path, clock=clock, check_interval_s=5)
    s.load()
    start = clock.now
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **kw: stats.append(a) or real_stat(*a, **kw))
    write_as_other_process(s.path, QWEN_CODE_FILE)
    stats.clear()

    for elapsed in (0, 1, 4.999):
        clock.now = start + elapsed
        assert not s.changed()  # the load was the last check: no syscall, though the file changed
    assert stats == []
    clock.now = start + 5
    assert s.changed()
    assert len(stats) == 1
    clock.now = start + 9.999
    assert not s.changed()
    assert len(stats) == 1
    clock.now = start + 10
    assert s.changed()
    assert len(stats) == 2


def test_a_load_or_save_restarts_the_check_interval(tmp_path):
    clock = FakeClock()
    s = CredentialStore(tmp_path, clock=clock)
    s.load()
    clock.now += 4
    s.save(creds())
    write_as_other_process(s.path, QWEN_CODE_FILE)
    clock.now += 4  # 8 s after the load, 4 s after the save
    assert not s.changed()
    clock.now += 1
    assert s.changed()


def test_changed_never_reads_the_file(tmp_path, monkeypatch):
    clock = FakeClock()
    s = CredentialStore(tmp_path, clock=clock)
    s.save(creds())
    monkeypatch.setattr(os, "open", lambda *a, **kw: pytest.fail("changed() opened a file"))
    for _ in range(3):
        clock.now += 5
        s.changed()


def test_a_clock_that_goes_back_does_not_stall_checks(tmp_path):
    clock = FakeClock()
    s = CredentialStore(tmp_path, clock=clock)
    s.save(creds())
    assert not s.changed()
    clock.now -= 3600
    write_as_other_process(s.path, QWEN_CODE_FILE)
    assert s.changed()


def test_our_own_save_is_not_a_change(tmp_path):
    clock = FakeClock()
    s = CredentialStore(tmp_path, clock=clock)
    s.load()
    for token in ("one-token", "two-token"):
        s.save(creds(access_token=token))
        clock.now += 5
        assert not s.changed()


def test_a_write_right_after_our_save_is_a_change(tmp_path):
    clock = FakeClock()
    s = CredentialStore(tmp_path, clock=clock)
    s.save(creds(access_token="ours"))
    tmp = tmp_path / "theirs.tmp"
    tmp.write_text(json.dumps(valid_obj(access_token="thei")))  # same size as ours, no mtime bump
    os.replace(tmp, s.path)
    clock.now += 5
    assert s.changed()


# --- the lock, within one process ------------------------------------------------------------------------


async def soon(awaitable, timeout_s: float = 5):
    """Await something the test expects to happen at once; a bug then fails instead of hanging."""
    return await asyncio.wait_for(awaitable, timeout_s)


class StepSleep:
    """A sleep for the lock's back-off that the test releases step by step."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.waiting = asyncio.Event()
        self.proceed = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.waiting.set()
        await self.proceed.wait()
        self.proceed.clear()


async def no_sleep_expected(seconds: float) -> None:
    pytest.fail(f"the lock waited {seconds} s although it should not have")


def foreign_lock(s: CredentialStore, content: bytes = b"held-by-someone-else", age_s: float = 0) -> None:
    s.home.mkdir(parents=True, exist_ok=True)
    s.lock_path.write_bytes(content)
    if age_s:
        t = time.time() - age_s
        os.utime(s.lock_path, (t, t))


async def test_the_lock_file_exists_while_held_and_holds_a_random_id(tmp_path):
    s = CredentialStore(tmp_path / ".qwen", sleep=no_sleep_expected)
    assert not s.lock_is_held()
    async with s.lock():
        content = s.lock_path.read_text()
        assert re.fullmatch(r"[0-9a-f]{32}", content)
        assert stat.S_IMODE(s.lock_path.stat().st_mode) == 0o600
        assert s.lock_is_held()
    assert not s.lock_path.exists()
    assert not s.lock_is_held()
    assert files_in(s.home) == []


async def test_a_second_acquirer_waits_until_the_first_releases(tmp_path):
    s = CredentialStore(tmp_path)
    steps = StepSleep()
    second = CredentialStore(tmp_path, sleep=steps)
    events = []
    first_in, first_may_leave = asyncio.Event(), asyncio.Event()

    async def first():
        async with s.lock():
            events.append("first in")
            first_in.set()
            await first_may_leave.wait()
        events.append("first out")

    async def other():
        async with second.lock():
            events.append("second in")

    t1 = asyncio.create_task(first())
    await soon(first_in.wait())
    t2 = asyncio.create_task(other())
    try:
        await soon(steps.waiting.wait())  # the second one found the lock taken and backs off
        assert events == ["first in"]
        first_may_leave.set()
        await soon(t1)
        steps.proceed.set()
        await soon(t2)
    finally:
        t1.cancel()
        t2.cancel()
    assert events == ["first in", "first out", "second in"]
    assert steps.calls == [0.1]


async def test_a_stale_lock_is_removed_at_once(tmp_path, caplog):
    s = CredentialStore(tmp_path, sleep=no_sleep_expected)
    foreign_lock(s, age_s=QWEN.lock_stale_s + 5)
    async with s.lock():
        assert s.lock_path.read_bytes() != b"held-by-someone-else"
    assert "stale credential lock" in caplog.text
    assert files_in(tmp_path) == []


async def test_a_lock_stamped_far_in_the_future_counts_as_stale(tmp_path):
    s = CredentialStore(tmp_path, sleep=no_sleep_expected)
    foreign_lock(s, age_s=-3600)
    async with s.lock():
        pass


async def test_a_fresh_foreign_lock_times_out_with_the_documented_back_off(tmp_path):
    delays = []

    async def record(seconds):
        delays.append(seconds)

    s = CredentialStore(tmp_path, sleep=record)
    foreign_lock(s)
    with pytest.raises(LockTimeout, match=r"oauth_creds\.lock is held by another process"):
        async with s.lock(timeout_s=10):
            pytest.fail("entered a lock held by someone else")
    assert delays[:4] == pytest.approx([0.1, 0.15, 0.225, 0.3375])
    assert max(delays) == 2.0
    assert sum(delays) == pytest.approx(10)
    assert s.lock_path.read_bytes() == b"held-by-someone-else"


async def test_the_default_timeout_outlasts_the_stale_limit(tmp_path):
    delays = []

    async def record(seconds):
        delays.append(seconds)

    s = CredentialStore(tmp_path, sleep=record)
    foreign_lock(s)
    with pytest.raises(LockTimeout):
        async with s.lock():
            pass
    assert sum(delays) > QWEN.lock_stale_s


async def test_lock_timeout_in_real_time(tmp_path):
    s = CredentialStore(tmp_path)
    foreign_lock(s)
    started = time.monotonic()
    with pytest.raises(LockTimeout):
        async with s.lock(timeout_s=0.2):
            pass
    assert 0.2 <= time.monotonic() - started < 2


async def test_release_leaves_a_foreign_lock_alone(tmp_path, caplog):
    s = CredentialStore(tmp_path)
    async with s.lock():
        # Ours was broken as stale and someone else took the lock.
        (tmp_path / "x").write_bytes(b"someone-else")
        os.replace(tmp_path / "x", s.lock_path)
    assert s.lock_path.read_bytes() == b"someone-else"
    assert "no longer ours" in caplog.text
    assert files_in(tmp_path) == ["oauth_creds.lock"]


async def test_release_copes_with_a_vanished_lock(tmp_path):
    s = CredentialStore(tmp_path)
    async with s.lock():
        os.unlink(s.lock_path)
    assert files_in(tmp_path) == []


async def test_the_lock_is_released_when_the_body_raises(tmp_path):
    s = CredentialStore(tmp_path)
    with pytest.raises(KeyError):
        async with s.lock():
            raise KeyError("boom")
    assert not s.lock_path.exists()


async def test_the_lock_is_released_when_the_holder_is_cancelled(tmp_path):
    s = CredentialStore(tmp_path)
    inside = asyncio.Event()

    async def holder():
        async with s.lock():
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(holder())
    await soon(inside.wait())
    assert s.lock_path.exists()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await soon(task)
    assert not s.lock_path.exists()


async def test_a_waiter_cancelled_while_waiting_leaves_the_holders_lock(tmp_path):
    steps = StepSleep()
    s = CredentialStore(tmp_path, sleep=steps)
    foreign_lock(s)
    task = asyncio.create_task(s.lock().__aenter__())
    await soon(steps.waiting.wait())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await soon(task)
    assert s.lock_path.read_bytes() == b"held-by-someone-else"
    assert files_in(tmp_path) == ["oauth_creds.lock"]


async def test_breaking_a_stale_lock_spares_a_fresh_one_taken_meanwhile(tmp_path, monkeypatch):
    # Between our stat (stale) and our rename, another process broke the stale lock itself and
    # took a fresh one. We must put that one back, not delete it.
    delays = []

    async def record(seconds):
        delays.append(seconds)

    s = CredentialStore(tmp_path, sleep=record)
    foreign_lock(s, b"stale", age_s=QWEN.lock_stale_s + 5)
    real_rename = os.rename
    raced = []

    def racing_rename(src, dst):
        if Path(src) == s.lock_path and not raced:
            raced.append(True)
            os.unlink(s.lock_path)
            s.lock_path.write_bytes(b"fresh-other")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", racing_rename)
    with pytest.raises(LockTimeout):
        async with s.lock(timeout_s=1):
            pass
    assert raced
    assert s.lock_path.read_bytes() == b"fresh-other"
    assert files_in(tmp_path) == ["oauth_creds.lock"]


async def test_the_lock_creates_a_missing_directory(tmp_path):
    s = CredentialStore(tmp_path / "new" / ".qwen")
    async with s.lock():
        assert stat.S_IMODE(s.home.stat().st_mode) == 0o700


# --- the lock, across processes -----------------------------------------------------------------------------


async def start_worker(*args: str) -> asyncio.subprocess.Process:
    path = os.pathsep.join(filter(None, [str(PACKAGE_DIR), os.environ.get("PYTHONPATH")]))
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=path),
    )


async def read_line(proc: asyncio.subprocess.Process) -> str:
    line = await soon(proc.stdout.readline(), 10)
    assert line, f"worker exited early with {await proc.wait()}"
    return line.decode().strip()


@pytest.mark.slow
async def test_a_lock_left_by_a_killed_process_is_recovered(tmp_path):
    s = CredentialStore(tmp_path)
    proc = await start_worker("hold", str(tmp_path))
    try:
        assert await read_line(proc) == "locked"
        held_by_worker = s.lock_path.read_bytes()
        proc.send_signal(signal.SIGKILL)
        assert await soon(proc.wait(), 10) == -signal.SIGKILL
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert s.lock_path.read_bytes() == held_by_worker  # the dead holder left it behind
    async with s.lock(timeout_s=5, stale_s=0.3):
        assert s.lock_path.read_bytes() != held_by_worker
    assert not s.lock_path.exists()


@pytest.mark.slow
async def test_a_live_holder_in_another_process_is_waited_for(tmp_path):
    s = CredentialStore(tmp_path)
    proc = await start_worker("hold", str(tmp_path))
    try:
        assert await read_line(proc) == "locked"
        with pytest.raises(LockTimeout):
            async with s.lock(timeout_s=0.3):
                pass
        proc.stdin.close()  # the worker leaves its lock and exits
        assert await soon(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    async with s.lock(timeout_s=0, stale_s=3600):
        pass


@pytest.mark.slow
async def test_processes_racing_to_refresh_refresh_exactly_once(tmp_path):
    s = CredentialStore(tmp_path)
    s.save(creds(access_token="expired-token", expiry_date=1000))
    procs = [await start_worker("refresh", str(tmp_path)) for _ in range(4)]
    try:
        for p in procs:
            assert await read_line(p) == "ready"
        for p in procs:  # the start barrier: all are waiting on stdin; release them together
            p.stdin.write(b"go\n")
        await soon(asyncio.gather(*(p.stdin.drain() for p in procs)))
        results = [(await read_line(p)).split() for p in procs]
        assert [await soon(p.wait(), 10) for p in procs] == [0] * 4
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    verbs = sorted(verb for verb, _ in results)
    assert verbs == ["refreshed", "reused", "reused", "reused"]
    tokens = {token for _, token in results}
    assert tokens == {s.load().access_token}
    assert s.load().access_token.startswith("access-from-pid-")
    assert files_in(tmp_path) == ["oauth_creds.json"]


def test_save_sweeps_temp_files_of_dead_writers_only(tmp_path):
    import subprocess
    import sys

    store = CredentialStore(tmp_path)
    store.save(creds())
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = tmp_path / f"oauth_creds.json.tmp-{int(gone.stdout)}-{'0' * 32}"
    alive = tmp_path / f"oauth_creds.json.tmp-{os.getpid()}-{'1' * 32}"
    other = tmp_path / "oauth_creds.json.corrupt-20260101T000000Z"
    for path in (dead, alive, other):
        path.write_text("{")
    store.save(creds(access_token="second-token-value"))
    assert not dead.exists()
    assert alive.exists() and other.exists()
