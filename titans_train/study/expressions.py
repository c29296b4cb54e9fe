"""Arithmetic expressions of a study's derived settings: `"max(2, dim // 32)"`, `"3e-3 * (params / 1e5) ** -0.25"`.

Only numbers, the names a run provides, + - * / // % **, comparisons, `a if c else b` and a few
functions are allowed: a study file is data, not code, so nothing is `eval`-ed.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Mapping

from titans_train.config.errors import InvalidValueError, closest

FUNCTIONS = {
    "min": min, "max": max, "round": round, "int": int, "float": float, "abs": abs,
    "sqrt": math.sqrt, "log": math.log, "log2": math.log2, "log10": math.log10, "exp": math.exp,
    "ceil": math.ceil, "floor": math.floor,
}
BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
           ast.Eq: operator.eq, ast.NotEq: operator.ne}


def evaluate(key: str, expression: str, names: Mapping[str, float]) -> float | int:
    """The value of `expression` with `names` bound; errors name `key` (the study-file key)."""
    try:
        tree = ast.parse(str(expression), mode="eval")
    except SyntaxError as error:
        raise InvalidValueError(key, f"cannot parse {expression!r}: {error.msg}") from error

    def value(node: ast.AST):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in names:
                near = closest(node.id, list(names) + list(FUNCTIONS))
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise InvalidValueError(key, f"unknown name {node.id!r} in {expression!r}; {hint}"
                                             f"names: {', '.join(sorted(names))}")
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            return BINARY[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = value(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in COMPARE:
            return COMPARE[type(node.ops[0])](value(node.left), value(node.comparators[0]))
        if isinstance(node, ast.IfExp):
            return value(node.body) if value(node.test) else value(node.orelse)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS and not node.keywords:
            return FUNCTIONS[node.func.id](*(value(arg) for arg in node.args))
        raise InvalidValueError(key, f"{ast.unparse(node)!r} is not allowed in {expression!r}: use numbers, "
                                     f"names, + - * / // % **, comparisons, if/else and {', '.join(FUNCTIONS)}")

    try:
        result = value(tree.body)
    except (ArithmeticError, ValueError, TypeError) as error:
        if isinstance(error, InvalidValueError):
            raise
        raise InvalidValueError(key, f"{expression!r} fails: {error}") from error
    if isinstance(result, bool) or not isinstance(result, (int, float)) or not math.isfinite(result):
        raise InvalidValueError(key, f"{expression!r} gives {result!r}, not a finite number")
    return int(result) if isinstance(result, float) and result.is_integer() and abs(result) < 2**53 else result
