"""x-lectr-route carries names an org admin chose (route, model, key): each
value is made header-safe by _header_text. Its fast path (a value with
nothing to escape) must give exactly what the escaping loop gives."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lectr.proxy.call import _header_text


def escaped(value: str | None, limit: int = 200) -> str:
    """The definition: visible ASCII but ; = % , kept, the rest %-escaped
    (UTF-8 bytes), the first ``limit`` characters, "-" for nothing."""
    if not value:
        return "-"
    out = []
    for c in value[:limit]:
        if 0x21 <= ord(c) <= 0x7E and c not in ";=%,":
            out.append(c)
        else:
            out.extend(f"%{b:02X}" for b in c.encode("utf-8", "replace"))
    return "".join(out)


@settings(max_examples=3000)
@given(
    st.none()
    | st.text(max_size=220)
    | st.text(alphabet=st.characters(min_codepoint=0x1F, max_codepoint=0x7F), max_size=220)
)
def test_header_text_is_the_escaping_whatever_the_value(value):
    out = _header_text(value)
    assert out == escaped(value)
    assert all(0x21 <= ord(c) <= 0x7E and c not in ";=," for c in out)


def test_plain_names_pass_as_they_are():
    for name in ("gpt-4o-mini", "smart", "us-east/llama-3.1:8b", "key_1.prod+a"):
        assert _header_text(name) == name
    assert _header_text("a;b=c,d e") == "a%3Bb%3Dc%2Cd%20e"
