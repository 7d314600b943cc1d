"""A digest of the machine code of every kernel specialisation, to show that two trees' kernels
compile to the same code (runs on a CPU: NVRTC, no GPU).

    python scripts/sass_digest.py                      # this tree's kernels
    python scripts/sass_digest.py --tree /path/to/old  # another checkout's kernel files
    python scripts/sass_digest.py --tree OLD --compare # both, and what differs

The specialisations are those of ``tests/kernel_cases.py`` (this tree's: the same constants for
both trees, so that a difference is a difference of the kernel sources). Each is compiled for
``--arch`` to a cubin. Per kernel the digest covers its code (``.text.<kernel>``), the code's
relocations, its resource table (``.nv.info``: registers, stack, parameter bank, barriers) and
the size of its shared memory, with every symbol named rather than numbered: a symbol table
that gains or loses an entry renumbers the others without changing any kernel.

The module's data is compared apart, by symbol name: NVRTC gives each namespace-scope
``constexpr`` variable a device copy and a slot in an address table (constant bank 4), whether
or not code reads it, so removing such a variable (a size the host now computes) changes the
module's data and leaves the kernels alone. ``--compare`` lists those variables; it fails on a
kernel that differs, on a variable of both trees whose value differs, and on a variable only one
tree has when its code reads the address table (checked with ``nvdisasm`` where installed:
``pip install nvidia-cuda-nvdisasm``; without it such a difference counts as unproven).
Line tables, which move with comments and paths, are left out.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]   # this checkout's cupy_ep and kernel cases

SHT_NOBITS = 8
SHT_RELA = 4
SHT_REL = 9
STT_OBJECT = 1
# .nv.info attributes whose payload starts with a symbol index (EIATTR_PARAM_CBANK, FRAME_SIZE,
# MIN_STACK_SIZE, MAX_STACK_SIZE, REGCOUNT)
SYMBOL_ATTRS = {0x0A, 0x11, 0x12, 0x23, 0x2F}
EIFMT_SVAL = 0x04
EIFMT_HVAL = 0x03
ADDRESS_BANK = ".nv.constant4"


@dataclass
class Cubin:
    """The parts of a cubin (a 64-bit little-endian ELF file) that the digest reads."""

    raw: bytes
    sections: dict = field(default_factory=dict)   # name -> (type, link, bytes or NOBITS size)
    names: list = field(default_factory=list)      # section names by index
    symbols: list = field(default_factory=list)    # (name, type, section index, value, size)

    @classmethod
    def parse(cls, raw: bytes) -> "Cubin":
        if raw[:4] != b"\x7fELF" or raw[4] != 2:
            raise ValueError("not a 64-bit ELF file")
        shoff, = struct.unpack_from("<Q", raw, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", raw, 0x3A)
        raw = raw + b"\0" * 4096   # a cubin a few bytes short (seen with CuPy's getCUBIN)
        headers = [struct.unpack_from("<IIQQQQIIQQ", raw, shoff + i * shentsize) for i in range(shnum)]
        out = cls(raw)

        def cstr(section: int, off: int) -> str:
            base = headers[section][4] + off
            return raw[base:raw.index(b"\0", base)].decode()

        for sh_name, sh_type, _, _, offset, size, link, *_ in headers:
            name = cstr(shstrndx, sh_name)
            out.names.append(name)
            out.sections[name] = (sh_type, link, size if sh_type == SHT_NOBITS else raw[offset:offset + size])
        if ".symtab" in out.sections:
            _, strtab, table = out.sections[".symtab"]
            for i in range(len(table) // 24):
                st_name, info, _, shndx, value, size = struct.unpack_from("<IBBHQQ", table, 24 * i)
                name = cstr(strtab, st_name) or (out.names[shndx] if shndx < len(out.names) else "")
                out.symbols.append((name, info & 0xF, shndx, value, size))
        return out

    def data(self, name: str) -> bytes:
        kind, _, content = self.sections.get(name, (0, 0, b""))
        return b"" if kind == SHT_NOBITS else content

    def relocations(self, target: str) -> list:
        """(offset, symbol name, type, addend) of the relocations of section ``target``."""
        out = []
        for prefix, entry in ((".rela", 24), (".rel", 16)):
            table = self.data(prefix + target)
            for i in range(len(table) // entry):
                offset, info = struct.unpack_from("<QQ", table, entry * i)
                addend = struct.unpack_from("<q", table, entry * i + 16)[0] if entry == 24 else 0
                out.append((offset, self.symbols[info >> 32][0], info & 0xFFFFFFFF, addend))
        return sorted(out)

    def info(self, name: str) -> list:
        """(format, attribute, symbol name or None, value) of each attribute of a ``.nv.info`` section."""
        table, i, out = self.data(name), 0, []
        while i + 4 <= len(table):
            fmt, attr = table[i], table[i + 1]
            if fmt == EIFMT_SVAL:
                size, = struct.unpack_from("<H", table, i + 2)
                payload = table[i + 4:i + 4 + size]
                if attr in SYMBOL_ATTRS and size >= 4:
                    out.append((fmt, attr, self.symbols[struct.unpack_from("<I", payload)[0]][0], payload[4:]))
                else:
                    out.append((fmt, attr, None, payload))
                i += 4 + size
            else:
                out.append((fmt, attr, None, table[i + 2:i + 4]))
                i += 4
        return out

    def globals(self) -> dict:
        """{name: bytes} of the module's variables (their initial value; NOBITS: zeros)."""
        out = {}
        for name, kind, shndx, value, size in self.symbols:
            if kind != STT_OBJECT or shndx >= len(self.names):
                continue
            section = self.sections[self.names[shndx]]
            out[name] = bytes(size) if section[0] == SHT_NOBITS else section[2][value:value + size]
        return out


def kernel_digests(cubin: Cubin) -> dict:
    """{kernel: 'digest code-bytes'} of every kernel of a cubin."""
    out = {}
    for sec in sorted(cubin.sections):
        if not sec.startswith(".text."):
            continue
        kernel = sec[len(".text."):]
        h = hashlib.sha256(cubin.data(sec))
        h.update(repr(cubin.relocations(sec)).encode())
        h.update(repr(cubin.info(f".nv.info.{kernel}")).encode())
        h.update(repr([a for a in cubin.info(".nv.info") if a[2] == kernel]).encode())
        shared = cubin.sections.get(f".nv.shared.{kernel}", (0, 0, 0))[2]
        h.update(str(shared if isinstance(shared, int) else len(shared)).encode())
        out[kernel] = f"{h.hexdigest()[:16]} {len(cubin.data(sec))}"
    return out


def reads_address_bank(cubin: Cubin) -> bool | None:
    """Whether any kernel's code reads the address table (``c[0x4]``); None without nvdisasm."""
    tool = shutil.which("nvdisasm")
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin.raw)
        f.flush()
        text = subprocess.run([tool, f.name], check=True, capture_output=True, text=True).stdout
    return "c[0x4]" in text


def tree_file(tree: Path, case_path: Path) -> Path:
    """The kernel file of ``tree`` that stands where ``case_path`` stands in this tree."""
    return tree / case_path.resolve().relative_to(REPO)


def compile_tree(tree: Path, arch: str) -> dict:
    """{case id: Cubin} for the kernel files of ``tree``."""
    from cupy_ep import jit
    from kernel_cases import kernel_cases

    out = {}
    for case in kernel_cases():
        if case.nvshmem:
            try:
                jit.nvshmem_include_dir()
            except FileNotFoundError:
                print(f"# {case.id}: skipped (no NVSHMEM headers)", file=sys.stderr)
                continue
        out[case.id] = Cubin.parse(jit.compile_check(tree_file(tree, case.path), case.constants, arch=arch,
                                                     nvshmem=case.nvshmem))
    return out


def compare_data(case: str, old: Cubin, new: Cubin) -> list:
    """Lines about the module data of one case; a line starting 'DIFFERS' fails the comparison."""
    a, b = old.globals(), new.globals()
    lines = [f"DIFFERS {case} variable {n}: value {a[n].hex()} -> {b[n].hex()}"
             for n in sorted(set(a) & set(b)) if a[n] != b[n]]
    alone = [(n, "old", a[n]) for n in sorted(set(a) - set(b))] + [(n, "new", b[n]) for n in sorted(set(b) - set(a))]
    if alone:
        read = [reads_address_bank(c) for c in (old, new)]
        verdict = ("DIFFERS" if any(read) else "unproven" if None in read else "data")
        for name, tree, value in alone:
            lines.append(f"{verdict} {case} variable {name} only in the {tree} tree (value {value.hex()}); "
                         + {"DIFFERS": "code reads the address table",
                            "unproven": "no nvdisasm to show no code reads the address table",
                            "data": "no code reads the address table (nvdisasm)"}[verdict])
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", type=Path, default=REPO, help="checkout whose kernel files to compile (default: this one)")
    ap.add_argument("--compare", action="store_true", help="also compile this tree's and list the differences")
    ap.add_argument("--arch", default="sm_90")
    args = ap.parse_args()
    os.environ.setdefault("CUPY_EP_CACHE_DIR", tempfile.mkdtemp(prefix="sass_digest."))
    other = compile_tree(args.tree.resolve(), args.arch)
    other_k = {(case, k): d for case, c in other.items() for k, d in kernel_digests(c).items()}
    for (case, kernel), digest in sorted(other_k.items()):
        print(f"{case} {kernel} {digest}")
    if not args.compare:
        return 0
    mine = compile_tree(REPO, args.arch)
    mine_k = {(case, k): d for case, c in mine.items() for k, d in kernel_digests(c).items()}
    keys = sorted(set(mine_k) | set(other_k))
    differ = [k for k in keys if mine_k.get(k) != other_k.get(k)]
    for case, kernel in differ:
        print(f"DIFFERS {case} {kernel}: {args.tree} {other_k.get((case, kernel))} | this tree {mine_k.get((case, kernel))}")
    data = [line for case in sorted(set(mine) & set(other)) for line in compare_data(case, other[case], mine[case])]
    print("\n".join(data)) if data else None
    print(f"{len(keys) - len(differ)} of {len(keys)} kernels identical; "
          f"{sum(not line.startswith('data') for line in data)} data differences that may matter")
    return 1 if differ or any(not line.startswith("data") for line in data) else 0


if __name__ == "__main__":
    sys.exit(main())
