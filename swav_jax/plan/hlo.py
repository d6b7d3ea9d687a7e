"""Reading the text of an optimised HLO module (`jax.stages.Compiled.as_text()`).

Only what the plan needs: each instruction's name, result type, opcode, operand names,
attributes and source (`metadata={op_name=...}`), and which computations are fusion
bodies (their values live in registers and on-chip memory, not in HBM). Operands are
printed by name only; their shapes come from the instructions that define them (names
are unique within a module).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

# `%name = TYPE opcode(operands)attributes`. TYPE may be a tuple and holds layouts such as
# {1,0:T(8,128)}, but never a space followed by `word(`.
_INSTRUCTION = re.compile(
    r"^\s+(?:ROOT\s+)?%(?P<name>[^\s=]+)\s*=\s*(?P<type>.*?)\s(?P<opcode>[a-z][a-z0-9\-]*)\((?P<operands>[^)]*)\)"
    r"(?P<attributes>.*)$"
)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[^\s(]+)")
_ARRAY = re.compile(r"(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[0-9,]*)\](?:\{(?P<layout>[^}]*)\})?")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%([^\s,}]+)")


@dataclasses.dataclass(frozen=True)
class Array:
    """One array of an instruction's result: dtype ('bf16'), dims, layout text ('' if none)."""

    dtype: str
    dims: tuple[int, ...]
    layout: str = ""

    @property
    def bytes(self) -> int:
        """Bytes of the logical array (no padding)."""
        return math.prod(self.dims) * _bits(self.dtype) // 8

    @property
    def padded_bytes(self) -> int:
        """Bytes in memory with the layout's tiling (TPU layouts such as {3,2,1,0:T(8,128)})."""
        order, _, tiling = self.layout.partition(":")
        tile = re.match(r"T\(([0-9,]+)\)", tiling)
        if not tile:
            return self.bytes
        minor_to_major = [int(d) for d in order.split(",") if d]
        return tiled_bytes(self.dims, _bits(self.dtype), minor_to_major, [int(t) for t in tile.group(1).split(",")])


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    computation: str
    type: str  # the result type as printed
    opcode: str  # e.g. 'convolution', 'fusion', 'all-reduce-done'
    operands: tuple[str, ...]  # operand names, without '%'
    attributes: str  # everything after the operand list
    op_name: str  # the jax source of the instruction (metadata), '' when none

    @property
    def arrays(self) -> tuple[Array, ...]:
        """The result arrays (several for a tuple; none for a token)."""
        return tuple(
            Array(m.group("dtype"), tuple(int(d) for d in m.group("dims").split(",") if d), m.group("layout") or "")
            for m in _ARRAY.finditer(self.type)
        )

    def attribute(self, key: str) -> str | None:
        """The text of attribute `key` (`window={size=3x3 ...}` -> 'size=3x3 ...'), or None."""
        m = re.search(rf"(?:^|[\s,]){re.escape(key)}=(\{{[^}}]*\}}|[^\s,]+)", self.attributes)
        if not m:
            return None
        value = m.group(1)
        return value[1:-1] if value.startswith("{") else value


@dataclasses.dataclass(frozen=True)
class Module:
    instructions: tuple[Instruction, ...]
    fusion_bodies: frozenset[str]  # computations called by fusion instructions
    num_partitions: int

    def by_name(self) -> dict[str, Instruction]:
        return {i.name: i for i in self.instructions}


def tiled_bytes(dims, bits: int, minor_to_major, tile) -> int:
    """Bytes of an array of `dims` and `bits`-bit elements in a tiled layout: the most minor dimensions rounded up
    to the first tile's sides (a tile of higher rank than the array pads size-1
    dimensions). E.g. f32[3,3,64] in {2,1,0:T(8,128)}: 3 x 8 x 128 x 4 bytes."""
    minor_first = [dims[d] for d in minor_to_major]
    elements = 1
    for j, t in enumerate(reversed(list(tile))):
        elements *= -(-minor_first[j] // t) * t if j < len(minor_first) else t
    elements *= math.prod(minor_first[len(tile):])
    return elements * bits // 8


def _bits(dtype: str) -> int:
    if dtype == "pred":
        return 8
    width = re.search(r"[0-9]+", dtype)  # bf16 -> 16, f8e4m3fn -> 8; token[] holds no data
    return int(width.group()) if width else 0


@functools.lru_cache(maxsize=4)  # the plan reads one module several ways
def parse_module(text: str) -> Module:
    """The instructions of an HLO module's text, in text order."""
    instructions, fusion_bodies = [], set()
    computation = ""
    partitions = re.search(r"num_partitions=([0-9]+)", text)
    for line in text.splitlines():
        if line and not line[0].isspace():
            header = _COMPUTATION.match(line)
            computation = header.group("name") if header and line.rstrip().endswith("{") else computation
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        attributes = m.group("attributes")
        op_name = _OP_NAME.search(attributes)
        operands = tuple(o.strip().lstrip("%") for o in m.group("operands").split(",") if o.strip())
        instruction = Instruction(
            m.group("name"), computation, m.group("type"), m.group("opcode"), operands, attributes,
            op_name.group(1) if op_name else "",
        )
        if instruction.opcode == "fusion":
            fusion_bodies.update(_CALLS.findall(attributes))
        instructions.append(instruction)
    return Module(tuple(instructions), frozenset(fusion_bodies), int(partitions.group(1)) if partitions else 1)
