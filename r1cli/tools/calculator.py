"""`calculator`: one arithmetic expression (+ - * / // % **, parentheses, decimals) evaluated exactly where it can
be (integers and fractions), without eval: only numbers and operators are read."""

from __future__ import annotations

import ast
import operator
from fractions import Fraction

from r1cli.tools import Observation, ToolLimits

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
MAX_DIGITS = 1000  # a result longer than this is refused (10**10**10 would take the machine)


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _value(node.operand)
        return v if isinstance(node.op, ast.UAdd) else -v
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        a, b = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow):
            if b.denominator != 1 or abs(b) * max(1, len(str(abs(a.numerator)))) > MAX_DIGITS:
                raise ValueError("exponent too large or not an integer")
        return Fraction(_OPS[type(node.op)](a, b))
    raise ValueError(f"not arithmetic: {ast.unparse(node)}")


def calculator(call: str, history: list[str], limits: ToolLimits) -> Observation:
    try:
        v = _value(ast.parse(call.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as e:
        return Observation(f"error: {e}", error=True)
    text = str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator} = {float(v):.12g}"
    return Observation(text, error=len(text) > MAX_DIGITS)
