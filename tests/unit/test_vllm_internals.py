"""vLLM internals only behind the adapter: no private vLLM name outside ``vllm_negablate/vllm_adapter.py``.

"Private vLLM name" is defined in the adapter's docstring, which also lists the
public imports and every private module and attribute the adapter touches.
This test reads those lists and scans every ``.py`` file of ``vllm_negablate``,
``server``, ``eval`` and ``bench`` (not ``tests``) with ``ast`` for:

* imports of vLLM modules other than the top-level package, and top-level
  names outside the public list (``from vllm import X``, ``vllm.X``,
  ``import_module("vllm.x")``);
* the adapter's *distinctive* private attribute names (``x.llm_engine``,
  ``getattr(x, "_block_hasher")``, ...).

A hit outside the adapter fails with ``file:line``, unless :data:`ALLOWED`
names that file and name with a reason and the exact number of uses (so a new
use fails too, and a fixed one asks for its entry to go). The adapter's lists
are checked against its code, and the scanner against known violations.
"""

from __future__ import annotations

import ast
import importlib.util
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ADAPTER = "vllm_negablate/vllm_adapter.py"
SCANNED = ("vllm_negablate", "server", "eval", "bench")

# (file, module or attribute name) -> (number of uses, why it is not in the adapter)
ALLOWED: dict[tuple[str, str], tuple[int, str]] = {
    ("vllm_negablate/ops.py", "vllm.utils.torch_utils"): (
        1, "direct_register_custom_op registers the clamp op at import; ops sits below the "
           "adapter (adapter -> engine_hooks -> runtime -> ops), so importing the adapter there "
           "would close an import circle, and ops must also import without vLLM (it falls back "
           "to plain torch.library)"),
    ("vllm_negablate/sharding.py", "vllm.distributed.utils"): (
        1, "get_pp_indices is vLLM's own pipeline-stage split, used so the layer ranges match "
           "vLLM's (VLLM_PP_LAYER_PARTITION included); sharding sits below the adapter "
           "(runtime/tables -> sharding), so the adapter cannot be imported there"),
}

WALKERS = ("getattr", "setattr", "hasattr", "delattr")
IMPORTERS = ("import_module", "__import__")


# ------------------------------------------------------------ adapter's lists
def _adapter_sections() -> dict[str, list[str]]:
    """The docstring's literal blocks: heading paragraph (ending ``::``) -> its lines."""
    doc = ast.get_docstring(ast.parse((ROOT / ADAPTER).read_text()))
    assert doc, f"{ADAPTER} has no docstring"
    paragraphs = doc.split("\n\n")
    sections: dict[str, list[str]] = {}
    for heading, block in zip(paragraphs, paragraphs[1:]):
        if heading.rstrip().endswith("::"):
            sections[" ".join(heading.split())] = [
                line.strip() for line in block.splitlines() if line.strip()]
    return sections


def _section(sections: dict[str, list[str]], title: str) -> list[str]:
    found = [lines for heading, lines in sections.items() if heading.startswith(title)]
    assert len(found) == 1, f"{ADAPTER}: expected one docstring block '{title}...::'"
    return found[0]


def adapter_lists():
    """(public names, {private module: names}, distinctive attrs, shared attrs) from the docstring.

    Attribute entries read ``Owner.attr  comment``; the sets hold ``Owner.attr``.
    """
    sections = _adapter_sections()
    public = {line.split()[0] for line in _section(sections, "Public vLLM imports")}
    modules: dict[str, set[str]] = {}
    for line in _section(sections, "Private vLLM modules"):
        module, _, names = line.partition(":")
        modules[module.strip()] = {n.strip() for n in names.split(",") if n.strip()}
    distinctive = {line.split()[0] for line in _section(sections, "Private vLLM attributes, distinctive")}
    shared = {line.split()[0] for line in _section(sections, "Private vLLM attributes, shared")}
    return public, modules, distinctive, shared


def attr_of(entry: str) -> str:
    return entry.rsplit(".", 1)[1]


# -------------------------------------------------------------------- scanner
def _is_vllm_module(name: str | None) -> bool:
    return bool(name) and (name == "vllm" or name.startswith("vllm."))


def scan(source: str, public: set[str], distinctive: set[str]) -> list[tuple[int, str, str]]:
    """Private vLLM names in ``source``: (line, key, what) where key is the module or attribute."""
    hits: list[tuple[int, str, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and _is_vllm_module(node.module):
            if node.module == "vllm":
                for alias in node.names:
                    if alias.name not in public:
                        hits.append((node.lineno, f"vllm.{alias.name}",
                                     f"from vllm import {alias.name} (not public)"))
            else:
                hits.append((node.lineno, node.module, f"from {node.module} import ..."))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("vllm."):
                    hits.append((node.lineno, alias.name, f"import {alias.name}"))
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "vllm" and node.attr not in public:
                hits.append((node.lineno, f"vllm.{node.attr}", f"vllm.{node.attr} (not public)"))
            if node.attr in distinctive:
                hits.append((node.lineno, node.attr, f".{node.attr}"))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            fname = func.id if isinstance(func, ast.Name) else func.attr if isinstance(
                func, ast.Attribute) else None
            if fname in WALKERS and len(node.args) >= 2:
                arg = node.args[1]
                if isinstance(arg, ast.Constant) and arg.value in distinctive:
                    hits.append((node.lineno, arg.value, f"{fname}(..., {arg.value!r})"))
            elif fname in IMPORTERS:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) \
                        and arg.value.startswith("vllm."):
                    hits.append((node.lineno, arg.value, f"{fname}({arg.value!r})"))
    return sorted(hits)


def _files() -> list[Path]:
    return sorted(p for top in SCANNED for p in (ROOT / top).rglob("*.py"))


# ---------------------------------------------------------------------- tests
def test_no_private_vllm_name_outside_the_adapter():
    public, _, distinctive, _ = adapter_lists()
    names = {attr_of(e) for e in distinctive}
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in _files():
        rel = path.relative_to(ROOT).as_posix()
        if rel == ADAPTER:
            continue
        for line, key, what in scan(path.read_text(), public, names):
            found[(rel, key)].append(f"{rel}:{line}: {what}")
    errors = []
    for key, hits in sorted(found.items()):
        expected = ALLOWED.get(key, (0, ""))[0]
        if len(hits) != expected:
            errors += hits if expected == 0 else [
                f"{h}  (allow-listed {expected} use(s) of {key[1]!r} here, found {len(hits)})"
                for h in hits]
    errors += [f"{file}: allow-listed {name!r} is no longer used; drop it from ALLOWED"
               for (file, name) in ALLOWED if (file, name) not in found]
    assert not errors, (
        "private vLLM names outside vllm_negablate/vllm_adapter.py (add a small function there "
        "and call it, or allow-list with a reason in tests/unit/test_vllm_internals.py):\n  "
        + "\n  ".join(errors))


def test_allow_list_entries_have_reasons():
    for (file, _), (count, reason) in ALLOWED.items():
        assert (ROOT / file).is_file() and count >= 1 and len(reason) > 20, file


def test_public_names_are_in_vllm_all():
    public, _, _, _ = adapter_lists()
    init = Path(importlib.util.find_spec("vllm").origin)  # not imported: no engine start-up cost
    exported: set[str] = set()
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                for t in node.targets):
            exported = set(ast.literal_eval(node.value))
    assert exported, f"no __all__ in {init}"
    assert public <= exported, f"not exported by vllm: {sorted(public - exported)}"


def test_adapter_lists_match_its_code():
    public, modules, distinctive, shared = adapter_lists()
    assert not distinctive & shared, sorted(distinctive & shared)
    tree = ast.parse((ROOT / ADAPTER).read_text())
    imported: dict[str, set[str]] = defaultdict(set)  # module -> names
    aliases: dict[str, str] = {}  # `import vllm.envs as envs`: envs -> vllm.envs
    attrs: set[str] = set()
    strings: set[str] = set()
    patched: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _is_vllm_module(node.module):
            imported[node.module] |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("vllm."):
                    imported[a.name]
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.Attribute):
            attrs.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.add(node.value)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_patch":
            owner, name = node.args[0], node.args[1]
            patched.add(f"{owner.id}.{name.value}")
    for node in ast.walk(tree):  # names read off `import vllm.x as x`
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in aliases:
            imported[aliases[node.value.id]].add(node.attr)

    from_vllm = imported.pop("vllm", set())
    assert from_vllm <= public, f"{ADAPTER}: list these private imports: {sorted(from_vllm - public)}"
    assert set(imported) == set(modules), (
        f"modules imported but not listed: {sorted(set(imported) - set(modules))}; "
        f"listed but not imported: {sorted(set(modules) - set(imported))}")
    for module, names in modules.items():
        assert imported[module] == names, \
            f"{module}: code uses {sorted(imported[module])}, listed {sorted(names)}"
    unused = sorted(e for e in distinctive | shared if attr_of(e) not in attrs | strings)
    assert not unused, f"listed in {ADAPTER}'s docstring but not used there: {unused}"
    unlisted = sorted(patched - distinctive - shared)
    assert not unlisted, f"patched but not listed in {ADAPTER}'s docstring: {unlisted}"


def test_the_scan_finds_each_kind_of_use():
    public, _, distinctive, _ = adapter_lists()
    names = {attr_of(e) for e in distinctive}
    source = "\n".join([
        "import vllm",                                         # 1 fine
        "from vllm import LLM, SamplingParams",                # 2 fine
        "from vllm import EngineArgs",                         # 3 not public
        "from vllm.platforms import current_platform",         # 4 private module
        "import vllm.envs as envs",                            # 5 private module
        "version = vllm.__version__",                          # 6 fine
        "config = vllm.config",                                # 7 not public
        "llm.llm_engine.engine_core.shutdown()",               # 8 two distinctive names
        "getattr(request, '_block_hasher', None)",             # 9 by string
        "importlib.import_module('vllm.v1.request')",          # 10 by string
        "state.openai_serving_models.is_base_model('x')",      # 11
        "llm.collective_rpc('negablate_state')",               # 12 public
        "x.model_config.dtype",                                # 13 shared names: not scanned
    ])
    hits = scan(source, public, names)
    assert [(line, key) for line, key, _ in hits] == [
        (3, "vllm.EngineArgs"), (4, "vllm.platforms"), (5, "vllm.envs"), (7, "vllm.config"),
        (8, "engine_core"), (8, "llm_engine"), (9, "_block_hasher"), (10, "vllm.v1.request"),
        (11, "is_base_model"), (11, "openai_serving_models"),
    ]
