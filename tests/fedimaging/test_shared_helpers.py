"""The one JSON-object reader, and the library notices silenced by name (nothing else)."""

from __future__ import annotations

import warnings

import pytest

from fedimaging.io import read_json_object
from fedimaging.quiet import silence_library_notices

RAY_TIP = ("Tip: In future versions of Ray, Ray will no longer override accelerator visible devices env var "
           "if num_gpus=0 or num_gpus=None (default).")


class Refused(ValueError):
    pass


@pytest.mark.parametrize(("content", "says"), [
    (b'{"a": 1', "is not valid JSON"),
    (b"\xff\xfe{}", "is not UTF-8 text: invalid start byte at byte 0"),
    (b'{"n": ' + b"9" * 5000 + b"}", "is not valid JSON: Exceeds the limit"),  # no bare ValueError escapes
    (b"[" * 100_000 + b"]" * 100_000, "is nested too deeply to parse"),
    (b"[1, 2]", "expected a JSON object, found list"),
])
def test_every_bad_file_is_the_callers_error_naming_the_file(tmp_path, content, says):
    path = tmp_path / "thing.json"
    path.write_bytes(content)
    with pytest.raises(Refused) as caught:
        read_json_object(path, Refused)
    assert str(caught.value).startswith(str(path)) and says in str(caught.value)


def test_missing_file_and_what_the_caller_expected(tmp_path):
    with pytest.raises(Refused, match="does not exist"):
        read_json_object(tmp_path / "nowhere.json", Refused)
    (tmp_path / "m.json").write_text('"text"')
    with pytest.raises(ValueError, match=r"m.json: expected an object \{file: uid\}, found str"):
        read_json_object(tmp_path / "m.json", expected="an object {file: uid}")
    (tmp_path / "ok.json").write_text('{"a": [1, NaN]}')
    assert read_json_object(tmp_path / "ok.json")["a"][0] == 1


def _shown(message: str, category: type[Warning], module: str) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_library_notices()
        warnings.warn_explicit(message, category, f"/site-packages/{module.replace('.', '/')}.py", 1, module=module)
    return [str(w.message) for w in seen]


def test_only_the_named_library_notices_are_silenced():
    assert _shown(RAY_TIP, FutureWarning, "ray._private.worker") == []
    # the same text from elsewhere, another Ray FutureWarning, a warning about the user's data: all shown
    assert _shown(RAY_TIP, FutureWarning, "fedimaging_site_code") == [RAY_TIP]
    other = "Pydantic v1 is deprecated and will no longer be supported in Ray 2.56."
    assert _shown(other, FutureWarning, "ray._private.worker") == [other]
    data = "The value length (17) exceeds the maximum length of 16 allowed for VR SH."
    assert _shown(data, UserWarning, "pydicom.valuerep") == [data]
