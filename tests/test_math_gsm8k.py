"""GSM8K and MATH verifiers: equivalent forms, wrong answers, hostile input, routing, real data."""
import json
import math
import select
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
from common import gsm8k_extract, gsm8k_score, math_extract, math_normalize, math_score, verify  # noqa: E402


def read_jsonl(name):
    with open(ROOT / "data" / name) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- GSM8K

@pytest.mark.parametrize("response, expected", [
    ("She makes 9 * 2 = $18 every day.", "18"),
    ("The total is 1,800 dollars.", "1800"),
    ("It costs $1,234,567.50 in all", "1234567.50"),
    ("The temperature drops to -5 degrees.", "-5"),
    ("10-5=5", "5"),  # a minus between digits is subtraction, not a sign
    ("the pairs 3,4 and", "4"),  # "3,4" is a list, not 34
    ("The answer is 18.", "18"),  # the sentence's full stop is not a decimal point
    ("no digits here", None),
    ("The answer is 18\u00bd.", "18.5"), ("It takes 2 \u00be hours", "2.75"), ("\u2153 of them", "0.333333"),  # (18½ paid 18)
    ("-3\u00bc degrees", "-3.25"), ("1.5\u00bd", "1.5"),
])
def test_gsm8k_extract(response, expected):
    assert gsm8k_extract(response) == expected


@pytest.mark.parametrize("response, gold, score", [
    ("So the answer is 18.", "Janet sells 9 eggs.\n#### 18", 1.0),
    ("So the answer is 18.", "18", 1.0),
    ("The answer is 18.0", "18", 1.0),
    ("The answer is $18.00.", "18", 1.0),
    ("That is 1,800 pens.", "1800", 1.0),
    ("That is 1800 pens.", "#### 1,800", 1.0),
    ("He is down -7 points.", "-7", 1.0),
    ("He is down 7 points.", "-7", 0.0),
    ("The answer is 17.", "18", 0.0),
    ("18 first, but the answer is 19", "18", 0.0),  # only the LAST number counts
    ("I don't know.", "18", 0.0),
    ("The answer is 18", "", 0.0),
    # found by a probe of natural answers (before: each read another number): thousands in LaTeX or thin spaces, a
    # unit's power, a sign before the dollar; never a plain space ("3 500-page books" are 3 books)
    ("The prize is $1\\,450\\,000$.", "1450000", 1.0),
    ("$\\boxed{1{,}450{,}000}$", "1450000", 1.0),
    ("The answer is 1\u202f450\u202f000.", "1450000", 1.0),
    ("The area is 18 m^2.", "18", 1.0),
    ("The volume is $18 \\text{ cm}^3$.", "18", 1.0),
    ("He ends at -$7.", "-7", 1.0),
    ("The answer is 1 450 000.", "1450000", 0.0),
    ("So 2^3 = 8", "8", 1.0),
])
def test_gsm8k_score(response, gold, score):
    assert gsm8k_score(response, gold) == score


# ----------------------------------------------------------------------------- MATH: extraction, normalization

def test_math_extract_commitments():
    # boxed and Minerva sentence both present: both are final answers, both are returned (both must be right)
    response = ("We get $x = 2$ and so $\\boxed{\\frac{1}{\\sqrt{2}}}$.\n"
                "Final Answer: The final answer is $\\frac{\\sqrt2}{2}$. I hope it is correct.")
    assert math_extract(response) == ["\\frac{1}{\\sqrt{2}}", "$\\frac{\\sqrt2}{2}$"]
    assert math_extract("\\boxed{a{b{c}}d} then \\fbox{7}") == ["7"]  # the LAST box, \fbox too
    assert math_extract("\\boxed{\\frac{1}{2}}") == ["\\frac{1}{2}"]  # nested braces kept whole
    assert math_extract("so $$x+1$$") == ["x+1"]  # display math
    assert math_extract("$4$ then \\boxed{5} then $6$") == ["5"]  # $...$ only when there is no box
    assert math_extract("no answer here") == []
    # LaTeX's own inline and display delimiters, as chat models write them (they paid 0): the last span of any kind
    assert math_extract("The answer is \\(15\\).") == ["15"] and math_extract("so\n\\[x = 15\\]\n") == ["x = 15"]
    assert math_extract("$4$, then \\(5\\), then \\[6\\] and $7$") == ["7"]
    assert math_extract("$4$, then \\(5\\) at last") == ["5"] and math_extract("\\(4\\), so \\(5 \\) ") == ["5 "]
    # spans that end their line joined by a disjunction ("or", "/", "maybe"): a menu, each one an answer (before: the
    # last alone, paid where its boxed form was not); a list of solutions where the gold is one
    for menu in ["The answer is one of $4$, $4$, or $5$.", "It is $4$ or $5$.", "It is \\(4\\) or maybe \\(5\\).",
                 "$$4$$ or $$5$$", "$4$ / $5$", "\\[4\\] (or \\[5\\])", "so $x = 4$, or $x = 5$"]:
        assert math_score(menu, "5") == 0.0 and math_score(menu.replace("4", "5"), "5") == 1.0, menu
    assert math_extract("So $x = 1$ or $x = -2$.", listed=True) == ["x = 1, x = -2"]
    assert math_score("So $x = 1$ or $x = -2$.", "1, -2") == 1.0 and math_score("So $x = 1$ or $x = 3$.", "1, -2") == 0.0
    assert math_extract("We had $4$ before.\nSo it is $5$.") == ["5"]  # (an earlier line's span: a step, not a choice)
    assert math_extract("$2$ apples and $3$ pears make $5$") == ["5"]  # (words between: a sentence, not a menu)
    # "and", ";", commas alone join the steps of a solution, not a menu
    assert math_score("Solving, we get $x = 3$ and $y = 5$.", "5") == 1.0 and math_extract("$3$, $5$") == ["5"]
    assert math_score("The answer is \\(\\frac{1}{2}\\).", "\\frac12") == 1.0
    assert math_score("The answer is \\(\\frac{1}{3}\\).", "\\frac12") == 0.0
    # boxes that end a line joined only by "and" / "or", commas or "x =": a list of solutions, or each one an answer
    assert math_extract("So $x = \\boxed{1}$ or $x = \\boxed{-2}$.", listed=True) == ["1, -2"]
    assert math_extract("So $x = \\boxed{1}$ or $x = \\boxed{-2}$.") == ["1", "-2"]
    assert math_extract("\\boxed{3}, but then \\boxed{1} and \\boxed{-2}", listed=True) == ["1, -2"]
    assert math_extract("\\boxed{1}\n\\boxed{-2}", listed=True) == ["-2"]  # a box on an earlier line is a draft
    assert math_extract("\\boxed{4}, \\boxed{4}\nNo, the answer is $\\boxed 7$.") == ["7"]  # whatever the last box's form
    assert math_score("$\\boxed{3}$, $\\boxed{5}$, $\\boxed{7}$", "3, 5, 7") == 1.0
    assert math_score("$\\boxed{1+\\sqrt{19}}$ and $\\boxed{1-\\sqrt{19}}$", "1 \\pm \\sqrt{19}") == 1.0
    assert math_score("$\\boxed{1}$ and $\\boxed{-2}$ and $\\boxed{3}$", "1,-2") == 0.0
    assert math_score("$d = \\boxed{15\\frac{39}{40}},$ or $\\boxed{\\frac{639}{40}}$ inches.", "\\frac{639}{40}") == 1.0
    for hedge in ["\\boxed{4} or maybe \\boxed{5}", "\\boxed{4} / \\boxed{5}", "\\boxed{4} (or \\boxed{5})"]:  # (paid before)
        assert math_score(hedge, "5") == 0.0, hedge
    assert math_extract("\\boxed{4} and \\boxed{unclosed {") == [""]  # the last box is broken: committed to nothing
    # the response ends at its first Minerva sentence: what follows is a made-up next problem
    assert math_extract("Final Answer: The final answer is $4$. I hope it is correct.\nProblem: \\boxed{9}") == ["$4$"]


@pytest.mark.parametrize("raw, normalized", [
    ("\\dfrac{3}{4}", "\\frac{3}{4}"),
    ("\\tfrac12", "\\frac{1}{2}"),
    ("\\frac12", "\\frac{1}{2}"),
    ("\\sqrt2", "\\sqrt{2}"),
    ("5\\text{ cm}", "5"),
    ("15\\mbox{ cm}^2", "15"),
    ("12 \\text{ km/h}", "12"),  # a rate (before: 12/h, and 12 \\text{ m/s} paid 0)
    ("12\\,\\mathrm{m/s}^2", "12"),
    ("12 \\text{ more/less}", "12more/less"),  # (a hedge stays, as its words alone do)
    ("30^\\circ", "30"),
    ("30^{\\circ}", "30"),
    ("\\text{Evelyn}", "Evelyn"),
    ("\\$36", "36"),
    ("1,000,000", "1000000"),
    ("x = 5", "5"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("4.", "4"),
    ("$\\frac{2}{3}$", "\\frac{2}{3}"),
    # as models write them (before, each stayed apart from the plain form): spacing commands, \displaystyle,
    # \mathrm / \mathbf, a final '.' after thousands groups, "x \in" inside $...$
    ("10\\,080", "10080"),
    ("5~\\text{cm}", "5"),
    ("5\\mathrm{~cm}", "5"),
    ("\\displaystyle \\frac{1}{2}", "\\frac{1}{2}"),
    ("\\mathbf{(C)}", "(C)"),
    ("58,500.", "58500"),
    ("$x \\in [-2,7]$", "[-2,7]"),
    ("2\\pi\\,r", "2\\pi*r"),
    ("10%", "10"),
    ("\\cfrac{1}{2}", "\\frac{1}{2}"),
    ("30\u00b0", "30"),
    ("\\varnothing", "\\emptyset"),
    ("(-\\infty, 2)", "(-\\infty,2)"),  # a unit word ("ft") is not deleted from inside a command
    ("\\sigma^2\\text{ cm}", "\\sigma^2"),
    ("\\dbinom{8}{4}", "\\binom{8}{4}"),
    ("\\tbinom52", "\\binom{5}{2}"),
    # a unit goes whole, with its power, from \mathrm{} too (Minerva's word rules made "6\\,\\mathrm{inches}^3" 6^3)
    ("6\\,\\mathrm{inches}^3", "6"),
    ("15\\ \\mathrm{cm^2}", "15"),
    ("864 \\text{ sq. in}", "864"),
    ("78 \\text{ cookies}", "78"),
    ("5 \\text{ or more}", "5ormore"),
    ("1 \\text{ in } 6", "1in6"),
    ("90\\degree", "90"),
    ("\\textbf{\\frac{14}{3}}", "\\frac{14}{3}"),  # up to the brace that closes it (before: "\\frac{14{3}}")
    ("\\cot(x)", "\\cotx"),
    ("\\cot{x}", "\\cotx"),
    ("\\sin(x)^2", "\\sin(x)^2"),
    ("288\u03c0", "288\\pi"),
    ("52_{(8)}", "52_8"),
    ("\\left[\\begin{array}{cc} 1 & 0 \\\\ 0 & 1 \\end{array}\\right]", "\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}"),
])
def test_math_normalize(raw, normalized):
    assert math_normalize(raw) == normalized


# ----------------------------------------------------------------------------- MATH: scoring

@pytest.mark.parametrize("response, gold", [
    ("so the answer is $\\boxed{\\dfrac{1}{2}}$.", "\\frac12"),
    ("$\\boxed{0.5}$", "\\frac{1}{2}"),  # decimal vs fraction
    ("$\\boxed{\\frac{3}{2}}$", "1.5"),
    ("$\\boxed{1.8}$", "1\\frac{4}{5}"),  # mixed number
    ("$\\boxed{5\\text{ cm}}$", "5"),  # units
    ("$\\boxed{30^\\circ}$", "30"),  # degrees
    ("$\\boxed{\\text{(B)}}$", "\\text{(B)}"),  # \text{}
    ("$\\boxed{\\text{even}}$", "\\text{even}"),
    ("$\\boxed{[2, 5)}$", "[2,5)"),  # intervals
    ("$\\boxed{(-\\infty, 0]}$", "(-\\infty, 0]"),
    ("$\\boxed{(3, \\pi/2)}$", "\\left( 3, \\frac{\\pi}{2} \\right)"),  # tuples, element-wise
    ("$\\boxed{(1.5, -13)}$", "\\left( \\frac{3}{2}, -13 \\right)"),
    ("$\\boxed{26,000}$", "26000"),  # commas in numbers
    ("The cost is $\\boxed{\\$36}$.", "\\$36"),  # leading (escaped) dollar
    ("$\\boxed{-\\frac{2}{3}}$", "-\\frac{2}{3}"),  # negative numbers
    ("$\\boxed{\\frac{-2}{3}}$", "-\\frac{2}{3}"),
    ("$\\boxed{\\frac{\\frac{1}{2}}{2}}$", "\\frac{1}{4}"),  # nested braces
    ("$\\boxed{\\frac{\\sqrt{2}}{2}}$", "\\frac{1}{\\sqrt{2}}"),  # symbolic
    ("$\\boxed{2\\sqrt{2}}$", "\\sqrt{8}"),
    ("$\\boxed{x^2 - 1}$", "(x-1)(x+1)"),
    ("$\\boxed{y = 3 + 2x}$", "y = 2x + 3"),
    ("$\\boxed{2^{10}}$", "1024"),
    ("Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.", "-\\frac23"),  # Minerva
    ("therefore the sum is $.0000672$", ".0000672"),  # last $...$
    ("$\\boxed{\\begin{pmatrix} -1 \\\\ 2 \\end{pmatrix}}$", "\\begin{pmatrix} -1 \\\\ 2 \\end{pmatrix}"),
    # an infinite end (before: Minerva's unit "ft" made \infty "\iny", so these were compared as strings only)
    ("$\\boxed{(-\\infty, -0.5)}$", "(-\\infty,-\\frac12)"),
    # a union of intervals is a set: its intervals in any order, each compared as an interval (before: as a string)
    ("$\\boxed{(3, \\infty) \\cup (-\\infty, 2)}$", "(-\\infty, 2) \\cup (3, \\infty)"),
    ("$\\boxed{(-\\infty,-0.5)\\cup(3,\\infty)}$", "(-\\infty,-\\frac{1}{2})\\cup(3,\\infty)"),
    ("$\\boxed{(12,102) \\cup (2,12)}$", "(2,12) \\cup (12,102)"),
    # a counting answer left as factorials and binomials (the release's parse_latex pays these; before: 0)
    ("$\\boxed{\\dbinom{8}{4}}$", "70"),
    ("$\\boxed{\\frac{8!}{4!\\,4!}}$", "70"),
    ("$\\boxed{\\frac{\\binom{4}{2}}{\\binom{8}{2}}}$", "\\frac{3}{14}"),
    ("$\\boxed{3\\binom{4}{2}}$", "18"),
    ("$\\boxed{(3+2)!}$", "120"),
    ("$\\boxed{\\binom{n}{2}}$", "\\frac{n(n-1)}{2}"),
    ("$\\boxed{5! = 120}$", "120"),
    ("$\\boxed{f(3) = 7}$", "7"),  # what precedes '=' names the answer
    ("$\\boxed{a_1 = 7}$", "7"),
    ("$\\boxed{x^2 = 7}$", "7"),
    ("$\\boxed{2x = 7}$", "7"),
    ("$\\boxed{m\\angle 1 = 7}$", "7"),
    # found by a recall probe of MATH-500 (before: each 0): units in \mathrm{} or outside the unit list, \degree,
    # a \frac inside \textbf{}, \cot(x), unicode pi and infinity, a base in parentheses, the exact value before its
    # approximation, a matrix as a bmatrix / array with its entries written otherwise
    ("$\\boxed{15\\,\\mathrm{cm}^2}$", "15\\mbox{ cm}^2"),
    ("$\\boxed{216\\,\\mathrm{inches}^3}$", "216"),
    ("$\\boxed{78\\text{ cookies}}$", "78"),
    ("$\\boxed{42\\text{ in.}}$", "42"),
    ("$\\boxed{3 \\text{ cookies}, 4 \\text{ cookies}}$", "3, 4"),
    ("$\\boxed{90\\degree}$", "90^\\circ"),
    ("$\\boxed{\\textbf{\\frac{14}{3}}}$", "\\frac{14}{3}"),
    ("$\\boxed{\\cot(x)}$", "\\cot x"),
    ("$\\boxed{288\u03c0}$", "288 \\pi"),
    ("$\\boxed{(2, \u221e)}$", "(2,\\infty)"),
    ("$\\boxed{52_{(8)}}$", "52_8"),
    ("$\\boxed{\\frac{20000}{\\pi} \\approx 6366.2}$", "\\frac{20000}{\\pi}"),
    # the same in the Minerva sentence (4-shot eval), whose closing "$" hid the approximation from the strip: paid 0
    ("Final Answer: The final answer is $\\frac{20000}{\\pi} \\approx 6366.2$. I hope it is correct.", "\\frac{20000}{\\pi}"),
    ("$\\boxed{\\frac{\\pi}{2} \\text{ radians}}$", "\\frac{\\pi}{2}"),
    ("$\\boxed{15 \\text{ min}}$", "15"),
    ("$\\boxed{1 \\text{ or } -2}$", "1,-2"),  # a list gold's solutions joined by "or", named or not
    ("$\\boxed{x = 1 \\text{ or } -2}$", "1,-2"),
    ("$\\boxed{3\u221a13}$", "3\\sqrt{13}"),
    ("$\\boxed{\u221a0.25}$", "0.5"),
    ("$\\boxed{\\frac{20,000}{\\pi}}$", "\\frac{20000}{\\pi}"),  # thousands groups in a brace
    ("$\\boxed{\\begin{bmatrix} -\\frac13 \\\\ \\frac{2}{3} \\\\ \\dfrac53 \\end{bmatrix}}$", "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}"),
    ("$\\boxed{\\left[\\begin{array}{cc} -1 & 0 \\\\ 0 & -1 \\end{array}\\right]}$", "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}"),
])
def test_math_equivalent_forms_score_1(response, gold):
    assert math_score(response, gold) == 1.0


@pytest.mark.parametrize("response, gold", [
    ("$\\boxed{\\frac{2}{3}}$", "-\\frac{2}{3}"),  # sign
    ("$\\boxed{0.67}$", "\\frac{2}{3}"),  # rounded
    ("$\\boxed{3.14159}$", "\\pi"),
    ("$\\boxed{(2, 5]}$", "[2,5)"),  # open vs closed ends differ
    ("$\\boxed{(1, 2)}$", "(2, 1)"),
    ("$\\boxed{(1, 2, 3)}$", "(1, 2)"),
    ("$\\boxed{x^2 + 1}$", "(x+1)^2"),
    ("$\\boxed{\\sqrt{3}}$", "\\sqrt{2}"),
    ("$\\boxed{27}$", "26"),
    ("$\\boxed{\\text{odd}}$", "\\text{even}"),
    ("$\\boxed{\\frac{1}{0}}$", "1"),
    ("I am not sure.", "5"),
    ("$\\boxed{}$", "5"),
    ("$\\boxed{__import__('os').system('true')}$", "5"),  # model text is never evaluated
    ("$\\boxed{(-\\infty, -0.5]}$", "(-\\infty,-\\frac12)"),
    ("$\\boxed{(-\\infty, 2) \\cup (4, \\infty)}$", "(-\\infty, 2) \\cup (3, \\infty)"),
    ("$\\boxed{(0, 9)}$", "(0,9) \\cup (9,36)"),  # part of the set
    ("$\\boxed{(0,9) \\cup (9,36) \\cup (0,9)}$", "(0,9) \\cup (9,36)"),  # each interval once
    ("$\\boxed{(0,9), (9,36)}$", "(0,9) \\cup (9,36)"),
    # a product with a zero factor is 0 whatever else it holds: "4 or 0" read as 4*o*r*0 was a hedge paid for 0
    ("$\\boxed{4 \\text{ or } 0}$", "0"),
    ("$\\boxed{0 \\text{ or maybe } 4}$", "0"),
    # infinity inside arithmetic is not an answer (1/oo = 0, oo^0 = 1 for sympy)
    ("$\\boxed{\\frac{1}{\\infty}}$", "0"),
    ("$\\boxed{\\infty^0}$", "1"),
    ("$\\boxed{(2, \\infty \\pi)}$", "(2, \\infty)"),
    # beside the one $...$ span, another answer: a menu, not the span (before: both paid 1)
    ("$\\boxed{3 \\text{ or } $5$}$", "5"),
    ("\\boxed{3, $5$}", "5"),
    # n! and binom(n, k): a wrong value, the double factorial (5!! = 15), an ambiguous 2^3!, numbers past 1000
    ("$\\boxed{\\binom{8}{3}}$", "70"),
    ("$\\boxed{5!!}$", "15"),
    ("$\\boxed{5!!}$", "120"),
    ("$\\boxed{2^3!}$", "64"),
    ("$\\boxed{\\binom{1001}{0}}$", "1"),
    ("$\\boxed{(10^{9})!}$", "1"),
    ("$\\boxed{\\binom{1.5}{1}}$", "\\frac{3}{2}"),
    ("$\\boxed{5! = 121}$", "120"),
    # letters the gold lacks are no part of its value, whatever they multiply out to: text ("or" is o·r) beside a
    # factor that cancels it (x - x, \binom{x}{x+1} = 0, ^0, \binom{.}{0} = 1), a hedge the zero-factor rule missed
    ("$\\boxed{4 \\text{ or } (x-x)}$", "0"),
    ("$\\boxed{(4 \\text{ or } 5)\\binom{x}{x+1}}$", "0"),
    ("$\\boxed{(4 \\text{ or } 5)(\\binom{x}{0}-1)}$", "0"),
    ("$\\boxed{4(\\text{or } 5)^0}$", "4"),
    ("$\\boxed{4\\binom{\\text{or } 5}{0}}$", "4"),
    ("$\\boxed{3x^0}$", "3"),
    # a unit's power is not the number's: "6 \\mathrm{inches}^3" (the cube's side) was paid as 6^3 = 216
    ("$\\boxed{6\\,\\mathrm{inches}^3}$", "216"),
    ("$\\boxed{3\\,\\mathrm{cm}^3}$", "27"),
    ("$\\boxed{30\\,\\mathrm{km}^2}$", "900"),
    # words after a number that hedge or change its value are not units
    ("$\\boxed{5 \\text{ or more}}$", "5"),
    ("$\\boxed{5 \\text{ thousand}}$", "5"),
    ("$\\boxed{2 \\text{ pi}}$", "2"),
    ("$\\boxed{90 \\text{ radians}}$", "90^\\circ"),
    ("$\\boxed{9 \\text{ is wrong}}$", "9"),
    ("$\\boxed{1 \\text{ in } 6}$", "16"),
    ("$\\boxed{5 \\text{ tens}}$", "5"),
    ("$\\boxed{5 \\text{ hundredths}}$", "5"),
    ("$\\boxed{90 \\text{ rad}}$", "90^\\circ"),
    ("$\\boxed{\\text{east}\\text{ west}}$", "\\text{east}"),  # a word is no number before a unit
    ("$\\boxed{1 \\text{ in } \\frac{1}{6}}$", "1\\frac{1}{6}"),  # a command after a unit reads with what precedes
    ("$\\boxed{5 \\text{ in} \\cdot 3}$", "15"),
    ("$\\boxed{\\cot (1) 0}$", "\\cot 10"),
    ("$\\boxed{\\cot(x)^2}$", "\\cot x"),
    ("$\\boxed{6366.2 \\approx \\frac{20000}{\\pi}}$", "\\frac{20000}{\\pi}"),  # the approximation is not the answer
    ("Final Answer: The final answer is $6366.2 \\approx 6366.2$. I hope it is correct.", "\\frac{20000}{\\pi}"),
    ("$\\boxed{5 \\approx 5 \\text{ or } 6}$", "5"),  # only a decimal number after \approx is an approximation
    ("$\\boxed{\\text{(C)} \\approx (D)}$", "\\text{(C)}"),
    ("$\\boxed{\u221a2.5}$", "\\frac{\\sqrt{2}}{2}"),  # not \\sqrt{2}.5
    # a matrix: every entry, in its place, a number as written
    ("$\\boxed{\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}}$", "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}"),
    ("$\\boxed{\\begin{pmatrix} -1/3 & 2/3 & 5/3 \\end{pmatrix}}$", "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}"),
    ("$\\boxed{\\begin{pmatrix} 2/3 \\\\ -1/3 \\\\ 5/3 \\end{pmatrix}}$", "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}"),
    ("$\\boxed{\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 1+2/3 \\end{pmatrix}}$", "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}"),
])
def test_math_wrong_answers_score_0(response, gold):
    assert math_score(response, gold) == 0.0


@pytest.mark.parametrize("name, response", [
    ("1 MB of prose", "we find 12 and $x$ then " * 45_000),
    ("1 MB of dollars", "$" * 1_000_000),
    ("1 MB box", "\\boxed{" + "1+" * 500_000 + "1}"),
    ("10k nested braces", "\\boxed{" * 10_000 + "1" + "}" * 10_000),
    ("10k unclosed braces", "\\boxed{" + "{" * 10_000),
    ("10k nested parens", "$" + "(" * 10_000 + "1" + ")" * 10_000 + "$"),
    ("power tower", "\\boxed{9^{9^{9^{9}}}}"),
    ("factorial tower", "\\boxed{((((5!)!)!)!)!}"),
    ("big factorials", "\\boxed{" + "1000!" * 20 + "}"),
    ("lists of big factorials", "\\boxed{" + ",".join(["1000!" * 47 + "\\pm1"] * 4) + "}"),
    ("huge power", "\\boxed{(x+1)^{100000}}"),
    ("many \\text{", "\\text{" * 100_000),
    ("many Minerva prefixes", "Final Answer: The final answer is " * 30_000),
    ("matrices never closed", "\\boxed{" + "\\begin{bmatrix} 1 \\end{foo}" * 3_500 + "}"),  # 5.4 s before
    ("units between blanks", "\\boxed{" + ("1 \\text{ cookies}" + " " * 1000) * 90 + "}"),
    ("100k blanks in a box", "\\boxed{1" + " " * 99_000 + "1}"),  # 15 s, then 36 s below, on the first draft
    ("100k blanks in a unit", "\\boxed{5 \\text{a" + " " * 99_000 + "!}}"),
    ("10k boxes on a line", ",".join(["\\boxed{2x+2}"] * 7_600)),  # 6 s when each was an answer to check
])
def test_hostile_responses_finish_fast(name, response):
    common.math_score("\\boxed{x+1}", "x+1")  # start the sympy worker outside the timed part
    for gold in ["1", "(x+1)^{999}", "\\frac{\\pi}{2}"]:
        start = time.perf_counter()
        assert common.math_score(response, gold) in (0.0, 1.0)
        assert gsm8k_score(response, gold) in (0.0, 1.0)
        elapsed = time.perf_counter() - start
        assert elapsed < common.MATH_SYMBOLIC_TIMEOUT_S + 3.0, f"{name} vs {gold}: {elapsed:.1f}s"
    start = time.perf_counter()
    math_normalize(response)
    assert time.perf_counter() - start < 3.0


def test_exact_values_are_computed_once_and_bounded():
    """The in-process half has no time limit: each subtree's exact value is computed once (the zero-factor check asks
    for every product's factors; before, a list of 47-factorial products took seconds), and none grows past
    _MAX_EXACT_BITS."""
    start = time.perf_counter()
    assert common._parse_latex(",".join(["1000!" * 47 + "\\pm1"] * 4))[0] == "seq"
    assert time.perf_counter() - start < 1.0
    assert common._rational_value(common._parse_latex("1000!")) == math.factorial(1000)
    assert common._rational_value(common._parse_latex("1000!1000!")) is None  # 17,000 bits


def test_symbolic_timeout_kills_and_recovers():
    gold = common._parse_latex("(x^2-1)^{20}")
    slow = common._parse_latex("(x+1)^{20}(x-1)^{20}")  # equal, but only simplify() can tell
    assert common._symbolic_match(gold, [gold])  # this thread's worker, booted
    start = time.perf_counter()
    assert common._symbolic_match(gold, [slow], timeout=1e-3) is False  # no time: killed, "not equal"
    assert time.perf_counter() - start < 2.0
    successor = common._worker.proc  # booting since the kill (importing torch: ~2 s), while the caller went on
    assert successor is not None and successor.poll() is None
    select.select([successor.stdout], [], [], 120)  # booted: the next call waits for the answer only
    start = time.perf_counter()
    assert common.math_score("$\\boxed{x^2-1}$", "(x-1)(x+1)") == 1.0  # the fresh worker takes over
    assert time.perf_counter() - start < 1.0 and common._worker.proc is successor


def test_one_time_budget_per_response():
    """Six values, each equal to the gold and each taking sympy ~2.7 s (under the limit alone), in one response's '='
    chains: 16 s before (the limit held per value), now the response's whole budget is MATH_SYMBOLIC_TIMEOUT_S."""
    value = lambda k: f"\\sqrt{{3}}(\\sqrt{{2}}+\\sqrt{{3}})^{{{k}}}(\\sqrt{{3}}-\\sqrt{{2}})^{{{k}}}(1+\\sqrt{{2}})^{{{k - 10}}}(\\sqrt{{2}}-1)^{{{k - 10}}}"
    response = (f"\\boxed{{x = {value(1000)} = {value(999)} = {value(998)}}} Final Answer: The final answer is "
                f"$x = {value(997)} = {value(996)} = {value(995)}$. I hope it is correct.")
    assert common.math_score("$\\boxed{x^2-1}$", "(x-1)(x+1)") == 1.0  # this thread's worker, booted
    start = time.perf_counter()
    common.math_score(response, "\\sqrt{3}")
    assert time.perf_counter() - start < common.MATH_SYMBOLIC_TIMEOUT_S + 1.5
    assert common._worker.budget is None  # a later response (or a direct call) has its own time


def test_many_threads():
    cases = [("$\\boxed{x^2 - 1}$", "(x-1)(x+1)", 1.0), ("$\\boxed{2\\sqrt{2}}$", "\\sqrt{8}", 1.0),
             ("$\\boxed{\\sqrt{3}}$", "\\sqrt{2}", 0.0), ("$\\boxed{0.5}$", "\\frac12", 1.0)]
    errors = []

    def work():
        for _ in range(3):
            for response, gold, want in cases:
                if math_score(response, gold) != want:
                    errors.append((response, gold))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# ----------------------------------------------------------------------------- routing

def test_verify_routes_by_dataset(monkeypatch):
    assert verify("gsm8k", "so 1,800 in all", "1800") == 1.0
    assert verify("gsm8k", "so 1,700 in all", "1800") == 0.0
    assert verify("MATH", "$\\boxed{\\frac12}$", "0.5") == 1.0  # the RLVR data spells it "MATH"
    assert verify("math", "$\\boxed{3}$", "0.5") == 0.0
    calls = []
    monkeypatch.setattr(common, "ifeval_rlvr_score", lambda r, gt, p: calls.append((r, gt, p)) or 1.0, raising=False)
    assert verify("ifeval", "hello", '{"func_name": "validate_lowercase"}', "Greet me.") == 1.0
    assert calls == [("hello", '{"func_name": "validate_lowercase"}', "Greet me.")]  # (the prompt too: _restates)
    with pytest.raises(ValueError, match="code_contests"):
        verify("code_contests", "x", "y")


# ----------------------------------------------------------------------------- real data

def test_math500_solutions_match_their_answers():
    rows = read_jsonl("math500_test.jsonl")
    failures = [(i, r["answer"]) for i, r in enumerate(rows) if math_score(r["solution"], r["answer"]) != 1.0]
    print(f"MATH-500 self-consistency: {1 - len(failures) / len(rows):.4f}; failures: {failures}")
    assert not failures


def test_gsm8k_answers_match_themselves():
    rows = read_jsonl("gsm8k_test.jsonl")
    for r in rows:
        gold = r["answer"]
        number = gold.split("#### ")[-1]
        assert gsm8k_score(gold, gold) == 1.0
        assert gsm8k_score(f"The answer is {number}.", gold) == 1.0
        assert gsm8k_score(f"The answer is {number}1.", gold) == 0.0
