"""What each register and stack slot may hold, per function: the dataflow of the static check.

The static C3 check (:mod:`harness.analysis.teardown_static`) walks the
call graph from the teardown; at each function it asks a
:class:`Disassembler` for the function's :class:`Facts`, given what the
argument registers hold on entry::

    function bytes (ModuleImage) --capstone--> instructions
        --> control-flow graph (jumps inside the function; a switch may go
            anywhere)
        --> per instruction, to a fixed point: a State, register or
            [rsp/rbp+n] slot -> the Values it may hold (a table pointer
            such as gBS, a member's address or pointer, a constant, the
            flags of a test/cmp of constants)
        --> Facts: the Sites (a call through a member, an unfollowed call,
            a jump nowhere, an sti), the Edges (direct calls and jumps out,
            with the values they pass), the table reads, what rax returns

It is a *may* analysis for the tables (a pointer from either way into an
instruction is kept) and a *must* analysis for the constants (a constant
counts only where every way in agrees), so a conditional jump is pruned
only when the constants decide it. Why a dataflow and not a pattern over
the instructions: ``gBS`` reaches its call through registers, stack slots
and return values, and ``MemoryMapLocked`` = TRUE, a constant argument,
decides which half of a shared worker the teardown can run. The tables'
layouts are :mod:`harness.analysis.service_tables`'; the paths, branches
and findings are the check's.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.analysis.moduleimage import Function, ModuleImage
from harness.analysis.service_tables import (
    BOOT_SERVICES,
    SERVICE_GROUPS,
    SYSTEM_TABLE,
    SYSTEM_TABLE_BOOT_SERVICES,
    Table,
)


@dataclass(frozen=True)
class Value:
    """What a register or stack slot may hold.

    ``kind``: ``table`` (a pointer to ``table``), ``slot`` (the address of a
    member: the table's address + ``offset``), ``member`` (the function
    pointer at ``offset``), ``global`` (the address of a tracked global),
    ``jumptable`` (a switch's computed target), ``const`` (the integer
    ``offset``), ``flags`` (what the last ``test``/``cmp`` found: ``via``
    is the mnemonic, ``offset`` encodes ZF, SF, CF, OF as bits 0..3).
    """

    kind: str
    table: Table | None = None
    via: str = ""
    origin: int = 0
    offset: int = 0


#: Register (``rax``), stack slot (``[rsp+0x28]``) or ``flags`` -> what it may hold.
State = dict[str, frozenset[Value]]
#: A :data:`State` made hashable (sorted items): a function's entry state,
#: the key of its memoized facts.
FrozenState = tuple[tuple[str, frozenset[Value]], ...]
_EMPTY: frozenset[Value] = frozenset()


@dataclass(frozen=True)
class Site:
    """One thing found in one function: a finding without its path."""

    kind: str
    target: str
    site: int
    instruction: str
    group: str = ""


@dataclass(frozen=True)
class Edge:
    """A direct call or jump out of one function: where, to what, and the
    tracked values it passes (the callee's entry state)."""

    site: int
    callee: Function
    state: FrozenState


@dataclass
class Facts:
    """What the dataflow of one function (with one entry state) found."""

    sites: list[Site] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    #: Reads of tracked globals: origin RVA -> (global name, instruction).
    reads: dict[int, tuple[str, str]] = field(default_factory=dict)
    #: Origins consumed by a member call.
    consumed: set[int] = field(default_factory=set)
    #: What the function may return in rax (tracked tables only).
    returns: frozenset[Value] = _EMPTY
    instructions: int = 0


_REGS64 = {
    **{r: r for r in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")},
    **{f"e{r[1:]}": r for r in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")},
    "ax": "rax", "bx": "rbx", "cx": "rcx", "dx": "rdx", "si": "rsi", "di": "rdi",
    "bp": "rbp", "sp": "rsp", "al": "rax", "ah": "rax", "bl": "rbx", "bh": "rbx",
    "cl": "rcx", "ch": "rcx", "dl": "rdx", "dh": "rdx", "sil": "rsi", "dil": "rdi",
    "bpl": "rbp", "spl": "rsp",
    **{f"r{n}{s}": f"r{n}" for n in range(8, 16) for s in ("", "d", "w", "b")},
}
#: What a call or jump passes on to its target (a switch's computed target
#: stays in its function).
_PASSED_KINDS = ("table", "slot", "member", "global", "const")
#: Registers a function may receive a tracked value in (SysV and MS ABI).
_ARGUMENT_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
#: Instructions that leave the flags as they were.
_KEEPS_FLAGS = ("mov", "movabs", "movzx", "movsx", "movsxd", "lea", "push", "pop", "nop",
                "endbr64", "leave", "xchg", "cdqe", "cqo", "cdq", "not", "bswap")
_ZF, _SF, _CF, _OF = 1, 2, 4, 8
#: Entry states analysed per function before its constants are dropped.
_MAX_VARIANTS = 4
#: Conditional jumps the constants can decide: taken when the lambda of
#: (ZF, SF, CF, OF) holds.
_CONDITIONS: Mapping[str, Any] = {
    "je": lambda z, s, c, o: z, "jne": lambda z, s, c, o: not z,
    "js": lambda z, s, c, o: s, "jns": lambda z, s, c, o: not s,
    "jb": lambda z, s, c, o: c, "jae": lambda z, s, c, o: not c,
    "jbe": lambda z, s, c, o: c or z, "ja": lambda z, s, c, o: not c and not z,
    "jl": lambda z, s, c, o: s != o, "jge": lambda z, s, c, o: s == o,
    "jle": lambda z, s, c, o: z or s != o, "jg": lambda z, s, c, o: not z and s == o,
}


def _flags(mnemonic: str, a: int, b: int, bits: int) -> int:
    mask = (1 << bits) - 1
    a, b = a & mask, b & mask
    sign = 1 << (bits - 1)
    if mnemonic == "test":
        result, carry, overflow = a & b, False, False
    else:                                   # cmp: a - b
        result = (a - b) & mask
        carry = a < b
        overflow = bool((a ^ b) & sign) and bool((a ^ result) & sign)
    return ((_ZF if result == 0 else 0) | (_SF if result & sign else 0)
            | (_CF if carry else 0) | (_OF if overflow else 0))


class _CS:
    """capstone's constants, bound when the first disassembler is made (the
    import costs 50 ms that a CLI start need not pay)."""

    CS_GRP_JUMP = CS_GRP_RET = CS_GRP_CALL = 0
    X86_OP_IMM = X86_OP_REG = X86_OP_MEM = X86_REG_RIP = 0


class Disassembler:
    """capstone over one image, and the dataflow of each function."""

    def __init__(self, image: ModuleImage) -> None:
        import capstone
        import capstone.x86

        for name in ("CS_GRP_JUMP", "CS_GRP_RET", "CS_GRP_CALL"):
            setattr(_CS, name, getattr(capstone, name))
        for name in ("X86_OP_IMM", "X86_OP_REG", "X86_OP_MEM", "X86_REG_RIP"):
            setattr(_CS, name, getattr(capstone.x86, name))
        self.image = image
        self.cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self.cs.detail = True
        self._insns: dict[str, list[Any]] = {}
        self._facts: dict[tuple[str, FrozenState], Facts] = {}
        self._busy: set[tuple[str, FrozenState]] = set()
        self._variants: collections.Counter[str] = collections.Counter()

    def instructions(self, function: Function) -> list[Any]:
        if function.name not in self._insns:
            self._insns[function.name] = list(
                self.cs.disasm(self.image.bytes_of(function), function.start))
        return self._insns[function.name]

    def reg(self, insn: Any, reg: int) -> str:
        name = str(insn.reg_name(reg)) if reg else ""
        return _REGS64.get(name, name)

    # The dataflow ---------------------------------------------------

    def facts(self, function: Function, entry: FrozenState) -> Facts:
        """The dataflow of ``function`` entered with ``entry`` (memoized;
        a recursive call sees no return value)."""
        key = (function.name, entry)
        if key in self._facts:
            return self._facts[key]
        if self._variants[function.name] >= _MAX_VARIANTS:
            # Called with many different constants (DebugPrint's error
            # levels): past a few, the constants are dropped, which can only
            # follow more branches, never fewer.
            entry = tuple((k, v) for k, v in ((k, frozenset(x for x in v if x.kind != "const"))
                                              for k, v in entry) if v)
            key = (function.name, entry)
            if key in self._facts:
                return self._facts[key]
        self._variants[function.name] += 1
        if key in self._busy:
            return Facts()
        self._busy.add(key)
        try:
            facts = self._run(function, dict(entry))
        finally:
            self._busy.discard(key)
        self._facts[key] = facts
        return facts

    def _run(self, function: Function, entry: State) -> Facts:

        insns = self.instructions(function)
        facts = Facts(instructions=len(insns))
        if not insns:
            return facts
        index = {insn.address: i for i, insn in enumerate(insns)}
        # Successors inside the function; an indirect jump (a switch) may go
        # to any instruction.
        succ: list[list[int]] = []
        for i, insn in enumerate(insns):
            nxt = [i + 1] if i + 1 < len(insns) else []
            if insn.group(_CS.CS_GRP_RET) or insn.mnemonic in ("hlt", "ud2"):
                succ.append([])
            elif insn.group(_CS.CS_GRP_JUMP):
                target = self._direct_target(insn)
                inside = [index[target]] if target in index else []
                if target is None:
                    inside = list(range(len(insns)))
                succ.append(inside + (nxt if insn.mnemonic != "jmp" else []))
            else:
                succ.append(nxt)
        preds = collections.Counter(j for targets in succ for j in targets)
        states: list[State | None] = [None] * len(insns)
        states[0] = entry
        work = collections.deque([0])
        queued = {0}
        returns: set[Value] = set()
        while work:
            i = work.popleft()
            queued.discard(i)
            state = states[i]
            assert state is not None
            insn = insns[i]
            out = self._step(function, insn, dict(state), facts)
            if insn.group(_CS.CS_GRP_RET):
                returns |= {v for v in state.get("rax", _EMPTY) if v.table is not None}
            for j in self._feasible(insn, state, succ[i], i):
                old = states[j]
                # One way in (most instructions): its state is the latest out.
                merged = out if old is None or (preds[j] <= 1 and j) else _join(old, out)
                if old is None or merged != old:
                    states[j] = merged
                    if j not in queued:
                        queued.add(j)
                        work.append(j)
        # Code no edge reaches at all (none should: a switch reaches
        # everything) is still read, from an empty state. Code only the
        # constants made unreachable is not: it cannot run on this path.
        static = _reachable(succ)
        for i, insn in enumerate(insns):
            if i not in static:
                self._step(function, insn, {}, facts)
        facts.returns = frozenset(returns)
        facts.sites = _unique(facts.sites)
        facts.edges = _unique(facts.edges)
        return facts

    def _feasible(self, insn: Any, state: State, successors: list[int], i: int
                  ) -> list[int]:
        """The successors the constants allow: a conditional jump whose
        flags are known goes one way."""
        condition = _CONDITIONS.get(insn.mnemonic)
        flags = state.get("flags", _EMPTY)
        if condition is None or not flags or len(successors) != 2:
            return successors
        taken = {bool(condition(bool(f.offset & _ZF), bool(f.offset & _SF),
                                bool(f.offset & _CF), bool(f.offset & _OF))) for f in flags}
        if len(taken) != 1:
            return successors
        target, fallthrough = successors
        if fallthrough != i + 1:
            return successors
        return [target] if taken.pop() else [fallthrough]

    def _direct_target(self, insn: Any) -> int | None:

        ops = insn.operands
        if len(ops) == 1 and ops[0].type == _CS.X86_OP_IMM:
            return int(ops[0].imm)
        return None

    def _consts(self, insn: Any, op: Any, state: State) -> set[int] | None:
        """The possible values of operand ``op``, or None if unknown."""

        if op.type == _CS.X86_OP_IMM:
            return {int(op.imm)}
        if op.type == _CS.X86_OP_REG:
            values = state.get(self.reg(insn, op.reg), _EMPTY)
            if values and all(v.kind == "const" for v in values):
                return {v.offset for v in values}
        return None

    def _step(self, function: Function, insn: Any, state: State, facts: Facts) -> State:

        mnemonic = insn.mnemonic
        ops = insn.operands
        self._note_reads(insn, facts)
        flags_before = state.get("flags")
        if mnemonic not in _KEEPS_FLAGS and not mnemonic.startswith("j"):
            state.pop("flags", None)
        if mnemonic == "sti":
            facts.sites.append(Site("interrupts", "sti (interrupts enabled)", insn.address,
                                     _text(insn)))
        is_call = insn.group(_CS.CS_GRP_CALL)
        is_jump = insn.group(_CS.CS_GRP_JUMP) and not is_call
        if is_call or (is_jump and mnemonic == "jmp"):
            target = self._direct_target(insn)
            returned: frozenset[Value] = _EMPTY
            if target is not None:
                returned = self._direct(function, insn, target, state, facts, is_call)
            else:
                self._indirect(insn, state, facts, is_call)
            if is_call:
                state["rax"] = returned
                # The callee may write through a pointer to a local (an OUT
                # parameter): a constant in a stack slot is no longer known.
                for key in [k for k in state if k.startswith("[")]:
                    state[key] = frozenset(v for v in state[key] if v.kind != "const")
            return state
        if is_jump:
            target = self._direct_target(insn)
            if target is not None and not (function.start <= target < function.end):
                self._direct(function, insn, target, state, facts, False)
            if flags_before is not None:
                state["flags"] = flags_before
            return state
        if mnemonic in ("test", "cmp") and len(ops) == 2:
            left, right = self._consts(insn, ops[0], state), self._consts(insn, ops[1], state)
            if left is not None and right is not None:
                bits = 8 * ops[0].size
                state["flags"] = frozenset(Value("flags", via=mnemonic,
                                                  offset=_flags(mnemonic, a, b, bits))
                                           for a in left for b in right)
            return state
        if len(ops) == 2 and ops[0].type == _CS.X86_OP_REG:
            dest = self.reg(insn, ops[0].reg)
            src = ops[1]
            size = ops[0].size
            if mnemonic in ("mov", "movabs") and src.type == _CS.X86_OP_IMM and size >= 4:
                state[dest] = frozenset([Value("const", offset=int(src.imm) & _mask(size))])
                return state
            if mnemonic == "xor" and src.type == _CS.X86_OP_REG and src.reg == ops[0].reg \
                    and size >= 4:
                state[dest] = frozenset([Value("const", offset=0)])
                return state
            if mnemonic in ("mov", "movzx") and src.type == _CS.X86_OP_REG and \
                    (size >= 4 or mnemonic == "movzx"):
                values = state.get(self.reg(insn, src.reg), _EMPTY)
                if src.size < 8:
                    values = frozenset(Value("const", offset=v.offset & _mask(src.size))
                                       for v in values if v.kind == "const")
                state[dest] = values
                return state
            if mnemonic in ("mov", "lea", "movsxd") and src.type == _CS.X86_OP_MEM:
                mem = src.mem
                base = self.reg(insn, mem.base)
                if mem.base == _CS.X86_REG_RIP:
                    address = insn.address + insn.size + mem.disp
                    state[dest] = self._global(insn, address, mnemonic == "lea", facts)
                    return state
                if mnemonic == "lea":
                    state[dest] = frozenset(
                        Value("slot", v.table, v.via, v.origin, v.offset + mem.disp)
                        for v in state.get(base, _EMPTY)
                        if v.kind == "table" and not mem.index)
                    return state
                if mem.index:
                    state[dest] = frozenset([Value("jumptable", origin=insn.address)])
                    return state
                state[dest] = self._load(base, mem.disp, state) if size == 8 else _EMPTY
                return state
            if mnemonic == "add" and src.type == _CS.X86_OP_IMM and size == 8:
                # A pointer into a table: the address of its member.
                state[dest] = frozenset(
                    Value("slot", v.table, v.via, v.origin, v.offset + int(src.imm))
                    for v in state.get(dest, _EMPTY) if v.kind in ("table", "slot"))
                return state
            if mnemonic == "add":
                values = state.get(dest, _EMPTY)
                if src.type == _CS.X86_OP_REG:
                    values = values | state.get(self.reg(insn, src.reg), _EMPTY)
                state[dest] = frozenset(v for v in values if v.kind == "jumptable")
                return state
        if mnemonic == "mov" and len(ops) == 2 and ops[0].type == _CS.X86_OP_MEM and \
                ops[1].type == _CS.X86_OP_REG:
            base = self.reg(insn, ops[0].mem.base)
            if base in ("rsp", "rbp") and not ops[0].mem.index and ops[0].size == 8:
                state[f"[{base}{ops[0].mem.disp:+#x}]"] = \
                    state.get(self.reg(insn, ops[1].reg), _EMPTY)
            return state
        if ops and ops[0].type == _CS.X86_OP_MEM and not ops[0].mem.index and \
                self.reg(insn, ops[0].mem.base) in ("rsp", "rbp"):
            # Any other write to a stack slot: what it held is gone.
            state.pop(f"[{self.reg(insn, ops[0].mem.base)}{ops[0].mem.disp:+#x}]", None)
        if mnemonic == "xchg" and len(ops) == 2 and all(o.type == _CS.X86_OP_REG for o in ops):
            a, b = self.reg(insn, ops[0].reg), self.reg(insn, ops[1].reg)
            state[a], state[b] = state.get(b, _EMPTY), state.get(a, _EMPTY)
            return state
        # Anything else that writes a register leaves nothing known in it.
        try:
            _, written = insn.regs_access()
        except Exception:  # noqa: BLE001 - capstone raises its own CsError
            written = []
        for reg in written:
            name = self.reg(insn, reg)
            if name in state:
                state[name] = _EMPTY
        return state

    def _note_reads(self, insn: Any, facts: Facts) -> None:
        """Any RIP-relative operand naming a tracked global, other than a
        ``lea``: a read of the table pointer."""

        if insn.mnemonic == "lea":
            return
        for op in insn.operands:
            if op.type == _CS.X86_OP_MEM and op.mem.base == _CS.X86_REG_RIP:
                known = self.image.globals_.get(insn.address + insn.size + op.mem.disp)
                if known is not None and known[1] is not None:
                    facts.reads[insn.address] = (known[0], _text(insn))

    def _global(self, insn: Any, address: int, is_lea: bool, facts: Facts
                ) -> frozenset[Value]:
        """A RIP-relative read (``mov``) or address (``lea``) of ``address``."""
        known = self.image.globals_.get(address)
        if known is None or known[1] is None:
            return _EMPTY
        name, table = known
        kind = "global" if is_lea else "table"
        return frozenset([Value(kind, table, name, insn.address)])

    def _load(self, base: str, disp: int, state: State) -> frozenset[Value]:
        """``mov reg, [base + disp]``."""
        if base in ("rsp", "rbp"):
            return state.get(f"[{base}{disp:+#x}]", _EMPTY)
        out: set[Value] = set()
        for value in state.get(base, _EMPTY):
            if value.kind == "global" and disp == 0:
                out.add(Value("table", value.table, value.via, value.origin))
            elif value.kind == "table" and value.table is SYSTEM_TABLE and \
                    disp == SYSTEM_TABLE_BOOT_SERVICES:
                out.add(Value("table", BOOT_SERVICES, f"{value.via}->BootServices",
                               value.origin))
            elif value.kind == "table":
                out.add(Value("member", value.table, value.via, value.origin, disp))
            elif value.kind == "slot":
                out.add(Value("member", value.table, value.via, value.origin,
                               value.offset + disp))
        return frozenset(out)

    def _direct(self, function: Function, insn: Any, target: int, state: State,
                facts: Facts, is_call: bool) -> frozenset[Value]:
        """A call or jump to ``target``; what it returns in rax."""
        callee = self.image.function_at(target)
        if callee is None:
            facts.sites.append(Site("unknown-target", f"{target:#x} (no function there)",
                                     insn.address, _text(insn)))
            return _EMPTY
        if not is_call and callee == function:
            return _EMPTY
        # A call passes the argument registers on; a jump (a tail call, or
        # into the function's ``.cold`` part) passes every register.
        keys = _ARGUMENT_REGS if is_call else tuple(
            k for k in state if not k.startswith("[") and k != "flags")
        passed = tuple(sorted(
            (k, v) for k, v in ((k, frozenset(x for x in state.get(k, _EMPTY)
                                              if x.kind in _PASSED_KINDS)) for k in keys) if v))
        facts.edges.append(Edge(insn.address, callee, passed))
        return self.facts(callee, passed).returns if is_call else _EMPTY

    def _indirect(self, insn: Any, state: State, facts: Facts, is_call: bool) -> None:

        op = insn.operands[0] if insn.operands else None
        values: frozenset[Value] = _EMPTY
        if op is not None and op.type == _CS.X86_OP_REG:
            values = frozenset(v for v in state.get(self.reg(insn, op.reg), _EMPTY)
                               if v.kind in ("member", "jumptable"))
        elif op is not None and op.type == _CS.X86_OP_MEM and op.mem.base != _CS.X86_REG_RIP \
                and not op.mem.index:
            values = self._load(self.reg(insn, op.mem.base), op.mem.disp, state)
        members = [v for v in values if v.kind == "member" and v.table is not None]
        if not is_call and not members and any(v.kind == "jumptable" for v in values):
            return                              # a switch inside the function
        if not is_call and op is not None and op.type == _CS.X86_OP_MEM and op.mem.index:
            return                              # jmp *table(,%reg,8): a switch
        if members:
            for value in members:
                assert value.table is not None
                member = value.table.member(value.offset)
                facts.consumed.add(value.origin)
                kind = "boot-service" if value.table.kind == "reference" else value.table.kind
                group = SERVICE_GROUPS.get(member, "") if kind == "boot-service" else ""
                facts.sites.append(Site(kind, f"{value.via}->{member}", insn.address,
                                         _text(insn), group))
            return
        facts.sites.append(Site("indirect", f"{insn.mnemonic} {insn.op_str} (not followed)",
                                 insn.address, _text(insn)))


def _mask(size: int) -> int:
    return (1 << (8 * size)) - 1


def _reachable(succ: Sequence[Sequence[int]]) -> set[int]:
    seen = {0}
    todo = [0]
    while todo:
        for j in succ[todo.pop()]:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return seen


def _text(insn: Any) -> str:
    return f"{insn.mnemonic} {insn.op_str}".strip()


def _join(a: State, b: State) -> State:
    """Both ways in: tracked tables are kept from either side (a may
    analysis); a constant or the flags only where both sides know them (a
    register missing or empty on one side holds anything there)."""
    if a == b:
        return a
    out = dict(a)
    for key in a.keys() | b.keys():
        left, right = a.get(key, _EMPTY), b.get(key, _EMPTY)
        if left == right:
            continue
        values = left | right
        if not _all_known(left) or not _all_known(right):
            values = frozenset(v for v in values if v.kind not in ("const", "flags"))
        out[key] = values
    return out


def _all_known(values: frozenset[Value]) -> bool:
    return bool(values) and all(v.kind in ("const", "flags") for v in values)


def _unique(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))

