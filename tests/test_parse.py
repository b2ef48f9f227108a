"""Stage 1: the grammar and the syntax tree."""

import pytest

from convspec.errors import SpecError
from convspec.parse import Call, Number, Word, parse_file, parse_text

from conftest import REFERENCE_SPECS, needs_shared


def entries(text):
    return {(s.name, e.key): e.value for s in parse_text(text, "t.cfg").sections for e in s.entries}


def test_sections_keys_lists_and_numbers():
    v = entries("[conv3a]\ninputs=pool2a,pool2b\nfilters=192,192\ngpu=0,1\nwc=.03\neps=1e-4\nx=-2\n")
    assert [i.text for i in v[("conv3a", "inputs")].items] == ["pool2a", "pool2b"]
    assert [i.value for i in v[("conv3a", "filters")].items] == [192, 192]
    assert v[("conv3a", "wc")].items[0].value == pytest.approx(0.03)
    assert v[("conv3a", "eps")].items[0].value == pytest.approx(1e-4)
    assert v[("conv3a", "x")].items[0].value == -2


def test_neuron_with_parameters_and_schedule():
    v = entries("[a]\nneuron=tanh[1.7159,0.6666]\nepsW=dexp[base=0.02;tgtFactor=250;numSteps=4]\n")
    neuron = v[("a", "neuron")].items[0]
    assert isinstance(neuron, Call) and neuron.name == "tanh"
    assert [a.value.value for a in neuron.args] == [1.7159, 0.6666]
    sched = v[("a", "epsW")].items[0]
    assert [(a.key, a.value.value) for a in sched.args] == [("base", 0.02), ("tgtFactor", 250), ("numSteps", 4)]


def test_comments_blank_lines_whitespace_and_missing_final_newline():
    text = "# header\n; also a comment\n\n[a]   \n  key = 3x224x224   # trailing\nk2:value ;x\n[b];c\nz=1"
    v = entries(text)
    assert isinstance(v[("a", "key")].items[0], Word) and v[("a", "key")].raw == "3x224x224"
    assert v[("a", "k2")].raw == "value"
    assert isinstance(v[("b", "z")].items[0], Number)


def test_locations_point_at_the_value():
    spec = parse_text("[a]\n\nfilters=abc\n", "x.cfg")
    entry = spec.sections[0].entries[0]
    assert (entry.loc.line, entry.loc.column) == (3, 1)
    assert (entry.value.loc.line, entry.value.loc.column) == (3, 9)


@pytest.mark.parametrize("text, message", [
    ("[a\nx=1\n", "t.cfg:1:1: section header '[a' is missing its closing ']'"),
    ("[a]\nx=1,\n", "t.cfg:2:5: line ends too early; expected a number or a value"),
    # ConfigParser's continuation lines (an indented line goes on with the value above): named, not read.
    ("[a]\ninputs=labels,\n  probs\n", "t.cfg:2:15: line ends too early; expected a number or a value; the "
     "indented line after it continues the value, which convspec does not read: join them into one line"),
    ("[a]\ninputs=labels\n\tprobs\n", "t.cfg:3:7: line ends too early; expected '='; an indented line continuing "
     "the value above it is not read by convspec: join it to line 2"),
    ("[a]\nx=tanh[1,2\n", "t.cfg:2:11: line ends too early; expected ',' or ';' or ']'"),
    ("[a]\n=3\n", "t.cfg:2:1: unexpected '='; a spec line is '[section]', 'key=value' or a comment starting with # or ;"),
    ("[a]\nkey value\n", "t.cfg:2:5: unexpected 'value'; expected '='"),
    # A ';' or '#' glued to a value is no comment: "inputs=pool2a;pool2b" silently lost pool2b.
    ("[a]\ninputs=pool2a;pool2b\n", "t.cfg:2:14: ';' right after a value starts no comment (put a space before it); "
                                    "list items are separated by ','"),
    ("[a]\nfilters=32#x\n", "t.cfg:2:11: '#' right after a value starts no comment (put a space before it); "
                            "list items are separated by ','"),
    ("[a]\nepsW=exp[base=1]#x\n", "t.cfg:2:17: '#' right after a value starts no comment (put a space before it); "
                                  "list items are separated by ','"),
])
def test_syntax_errors_are_located(text, message):
    with pytest.raises(SpecError) as err:
        parse_text(text, "t.cfg")
    assert str(err.value).split("\n")[0] == message


def test_syntax_error_shows_line_and_caret():
    with pytest.raises(SpecError) as err:
        parse_text("[a]\nkey value\n", "t.cfg")
    assert str(err.value).split("\n")[1:] == ["key value", "    ^"]


@needs_shared
@pytest.mark.parametrize("path", sorted(REFERENCE_SPECS.glob("*.cfg")), ids=lambda p: p.name)
def test_reference_files_parse(path):
    spec = parse_file(path)
    assert spec.sections and all(s.name for s in spec.sections)
