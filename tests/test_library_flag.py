"""library_uses: which library implementations a submission's own lines use (pure unit tests, no sandbox)."""

import time

from course_lib.grading.submissions import library_uses

TEMPLATE = ["from transformers import TopPLogitsWarper\nimport torch",
            "class Temperature:\n    def __call__(self, ids, scores):\n        raise NotImplementedError",
            "def top_p_filter(scores, top_p):\n    raise NotImplementedError",
            "# a demo the learner is given\ndemo = TopPLogitsWarper(0.9)"]
NAMES = {"q1": ["course_lib.decoding.Temperature", "transformers.TemperatureLogitsWarper"],
         "q2": ["course_lib.decoding.TopP", "transformers.TopPLogitsWarper", "transformers.MinPLogitsWarper"],
         "q3": ["torch.multinomial", "transformers.GenerationMixin.generate"]}
TOP_P = {"q2": ["transformers.TopPLogitsWarper"]}


def own(body: str) -> str:
    """A top_p_filter whose body is the learner's ``body``."""
    return "def top_p_filter(scores, top_p):\n    " + body


def test_an_alias_import_is_flagged():
    cells = ["from transformers import TopPLogitsWarper as T", own("return T(top_p)(None, scores)")]
    assert library_uses(cells, TEMPLATE, NAMES) == TOP_P


def test_a_module_alias_is_flagged():
    assert library_uses(["import transformers as tf", own("return tf.TopPLogitsWarper(top_p)(None, scores)")],
                        TEMPLATE, NAMES) == TOP_P
    assert library_uses(["import course_lib.decoding as d", "from course_lib import decoding",
                         "a = d.TopP(0.9)\nb = decoding.Temperature(0.7)"], TEMPLATE, NAMES) == \
        {"q1": ["course_lib.decoding.Temperature"], "q2": ["course_lib.decoding.TopP"]}


def test_an_assignment_alias_chain_is_flagged():
    cells = ["import transformers", "x = transformers.TopPLogitsWarper\nf = x", own("return f(top_p)(None, scores)")]
    assert library_uses(cells, TEMPLATE, NAMES) == TOP_P
    # the chain alone flags its last link too: the alias made on a template line, used on the learner's
    template = TEMPLATE + ["helper = TopPLogitsWarper"]
    assert library_uses(template + [own("return helper(top_p)(None, scores)")], template, NAMES) == TOP_P


def test_getattr_with_a_constant_string_is_flagged():
    cells = ["import transformers", own('return getattr(transformers, "TopPLogitsWarper")(top_p)(None, scores)')]
    assert library_uses(cells, TEMPLATE, NAMES) == TOP_P
    assert library_uses([own('return getattr(transformers, "Top" + "P")')], TEMPLATE, NAMES) == {}


def test_a_library_call_on_a_line_equal_to_a_tests_cell_line_is_flagged():
    tests_cell = ("@test('q2', expect=lambda: TopPLogitsWarper(0.8)(None, Q1_SCORES.clone()))\ndef keeps_mass():\n"
                  "    return TopPLogitsWarper(0.8)(None, Q1_SCORES.clone())")
    # the template is the learner's starting code without its tests cells, so a copied test line is the learner's
    assert library_uses(TEMPLATE + [own("return TopPLogitsWarper(0.8)(None, Q1_SCORES.clone())")], TEMPLATE,
                        NAMES) == TOP_P
    assert library_uses(TEMPLATE + [tests_cell.splitlines()[-1]], TEMPLATE + [tests_cell], NAMES) == {}
    cells = TEMPLATE + ["from course_lib.decoding import TopP as top_p_filter",
                        "def q():\n    return top_p_filter(Q1_SCORES.clone(), 0.8)"]
    assert library_uses(cells, TEMPLATE, NAMES) == {"q2": ["course_lib.decoding.TopP"]}


def test_a_repeated_template_import_and_a_use_on_the_learners_line_are_flagged():
    cells = ["from transformers import TopPLogitsWarper\nimport torch",
             own("probs = TopPLogitsWarper(top_p)(None, scores).softmax(-1)\n    return torch.multinomial(probs, 1)")]
    assert library_uses(cells, TEMPLATE, NAMES) == {"q2": ["transformers.TopPLogitsWarper"],
                                                   "q3": ["torch.multinomial"]}


def test_a_class_method_is_flagged_as_an_attribute_of_anything():
    names = {"q3": ["transformers.GenerationMixin.generate"]}
    assert library_uses(["out = model.generate(ids, max_new_tokens=5)"], TEMPLATE, names) == names
    assert library_uses(["from transformers import GenerationMixin\nf = GenerationMixin.generate"],
                        TEMPLATE, names) == names
    assert library_uses(['out = getattr(model, "generate")(ids)'], TEMPLATE, names) == names
    assert library_uses(["def generate(ids):\n    return ids\nout = generate(ids)"], TEMPLATE, names) == {}


def test_comments_and_strings_are_not_flagged():
    cells = [own("# like MinPLogitsWarper, but by hand\n    return scores"),
             'note = "TopPLogitsWarper does this; transformers.TopPLogitsWarper(0.9)"\n"""model.generate()"""']
    assert library_uses(cells, TEMPLATE, NAMES) == {}


def test_a_rewritten_import_line_alone_is_not_flagged():
    cells = ["from transformers import (MinPLogitsWarper,\n  TopPLogitsWarper)\nimport torch as th",
             own("return scores")]
    assert library_uses(cells, TEMPLATE, NAMES) == {}


def test_the_learners_own_class_is_not_the_library_unless_imported_from_it():
    cells = ["class Temperature:\n    def __init__(self, t):\n        self.t = t",
             "scaled = Temperature(0.7)(None, scores)"]
    assert library_uses(cells, TEMPLATE, NAMES) == {}
    # importing the library's class over the learner's own (no use needed: the tests then call the library's)
    assert library_uses(cells + ["from course_lib.decoding import Temperature"], TEMPLATE, NAMES) == \
        {"q1": ["course_lib.decoding.Temperature"]}
    assert library_uses(cells + ["from course_lib.decoding import *"], TEMPLATE, NAMES) == \
        {"q1": ["course_lib.decoding.Temperature"]}


def test_a_use_on_a_byte_identical_template_line_is_not_flagged():
    assert library_uses(TEMPLATE, TEMPLATE, NAMES) == {}
    # the same demo line indented differently is the learner's own
    assert library_uses(TEMPLATE[:3] + ["if True:\n demo = TopPLogitsWarper(0.9)"], TEMPLATE, NAMES) == TOP_P


def test_magics_and_syntax_errors_never_raise():
    cells = ["%time out = top_p_filter(scores, 0.9)\n!pip install transformers\n%matplotlib inline",
             "%%time\nx = 1", "def broken(:\n    TopPLogitsWarper(0.9)", "x = !ls\nTopPLogitsWarper(0.9)", ""]
    assert library_uses(cells, TEMPLATE, NAMES) == {}
    # the Python in a magic cell still counts, a line magic's argument too
    assert library_uses(["%%time\nw = TopPLogitsWarper(0.9)"], TEMPLATE, NAMES) == TOP_P
    assert library_uses(["%time w = TopPLogitsWarper(0.9)"], TEMPLATE, NAMES) == TOP_P


def test_any_input_is_fast_and_never_raises():
    chain = ["import transformers\na0 = transformers.TopPLogitsWarper\n" +
             "\n".join(f"a{i + 1} = a{i}" for i in range(300))]
    odd = ["a = b\nb = a\nc = c.d\nc = c.e\nprint(a, b, c)", "\0", "(" * 500 + ")" * 500, "x" + ".y" * 3000,
           "from . import x\nfrom .m import *\nx.TopP", "\ufeffT = 1", "getattr()\ngetattr(x)\ngetattr(x, 3)",
           "print(a300)"]
    assert isinstance(library_uses(chain + odd, chain, NAMES), dict)
    # line breaks are the parser's ("\r" too), so a line is the same line in the template and in the tree
    assert library_uses(["demo = 1\rw = TopPLogitsWarper(0.9)"], TEMPLATE, NAMES) == TOP_P
    assert library_uses(["x = 1\rdemo = TopPLogitsWarper(0.9)"], TEMPLATE, NAMES) == {}
    notebook = TEMPLATE + [own(f"v{i} = torch.softmax(scores / {i}, -1).cumsum(-1)\n    return scores") * 3
                           for i in range(26)]
    start = time.perf_counter()
    assert library_uses(notebook, TEMPLATE, NAMES) == {}
    assert time.perf_counter() - start < 0.5  # about 10 ms; generous for a busy machine
