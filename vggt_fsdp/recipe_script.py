'''A recipe that is also a Python script, so that any launcher can run it as it runs a training script.

`accelerate launch RECIPE.yaml`, `torchrun --nproc-per-node N RECIPE.yaml` and `python RECIPE.yaml`
all run `python RECIPE.yaml ARGS` in each process. A bundled recipe is written so that Python reads it
as a call to the trainer while YAML reads it as the recipe:

    # ... the header: comment lines only ...
    __script__: r"""   # (a YAML comment may follow)
    model:
      ...
    # """; import sys; from vggt_fsdp.train.__main__ import run_recipe_script; run_recipe_script(__file__, sys.argv)

YAML sees a mapping whose first key, `__script__`, holds the string `r"""`, and a comment as the last
line. Python sees comments, then the name `__script__` annotated with a raw string that runs from the
first key's line to the `"""` of the last line (so the recipe's own text is never Python), then the
statements after it, which train this file with the process's arguments as `key=value` overrides.

The loader (`vggt_fsdp.recipe.load_recipe`) accepts the key, drops it from the typed recipe, and checks
the layout (`check_script_layout`) so that an edit which would break the Python reading, such as a key
added after the last line or a `"""` inside the recipe, fails when the recipe is loaded, with the fix,
instead of as a SyntaxError in every process of a launch. A recipe without the key is a plain YAML
recipe: everything but running it as a script works the same.
'''
from __future__ import annotations

SCRIPT_KEY = "__script__"
OPENING = 'r"""'  # the key's value: for Python, a raw triple-quoted string begins here
QUOTES = '"""'
LAST_LINE = ('# """; import sys; from vggt_fsdp.train.__main__ import run_recipe_script; '
             "run_recipe_script(__file__, sys.argv)")


def pop_script_key(raw: dict) -> None:
    """Remove the `__script__` key from a loaded recipe mapping; its only valid value is 'r\"\"\"'."""
    if SCRIPT_KEY in raw and raw.pop(SCRIPT_KEY) != OPENING:
        raise ValueError(f"{SCRIPT_KEY} is reserved for the line that makes a recipe runnable as a script "
                         f"(`{SCRIPT_KEY}: {OPENING}`); remove it or give it that value")


def check_script_layout(text: str) -> None:
    """For a recipe whose mapping has the `__script__` key: raise ValueError, naming the fix, unless
    Python reads the file as this module's docstring describes."""
    lines = text.splitlines()
    body = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    first = next(((n, line) for n, line in body if not line.lstrip().startswith("#")), (0, ""))
    if not first[1].startswith(f"{SCRIPT_KEY}: {OPENING}"):
        raise ValueError(f"line {first[0]}: the recipe's first key must be `{SCRIPT_KEY}: {OPENING}`, after "
                         f"comment lines only (it starts the text Python skips); move it there or remove it")
    last_number, last = body[-1]
    if not last.startswith(f"# {QUOTES};"):
        raise ValueError(f"line {last_number}: a recipe with `{SCRIPT_KEY}` must end with the line that "
                         f"closes it and calls the trainer:\n{LAST_LINE}\n(Python would read anything after "
                         f"that line as code: move it above)")
    if text.count(QUOTES) != 2:
        extra = [n for n, line in body if line.count(QUOTES) > (n in (first[0], last_number))]
        raise ValueError(f"line(s) {extra}: a recipe with `{SCRIPT_KEY}` may hold {QUOTES} only on its "
                         f"first key's line and its last line (Python would end the string there); "
                         f"write the value another way")
    try:
        compile(text.encode(), "<recipe>", "exec")  # bytes, as Python reads the file: a coding cookie counts
    except SyntaxError as err:  # e.g. a header line that Python takes for an encoding declaration
        raise ValueError(f"line {err.lineno}: Python cannot read this recipe as a script ({err.msg}); "
                         f"its header must be comment lines and its last line:\n{LAST_LINE}") from None
