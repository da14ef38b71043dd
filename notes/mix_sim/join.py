"""Join frontier rows of several runs (later runs replace a method's rows), write JSON/MD/PNG."""
import json, sys
from pathlib import Path
from mixcache_compile.eval.frontier import fraction_at_levels, markdown, plot
out = Path(sys.argv[1]); inputs = sys.argv[2:]
rows, commands, meta = [], [], None
for path in inputs:
    d = json.loads(Path(path).read_text())
    meta = meta or d
    new = {r["method"] for r in d["rows"]}
    rows = [r for r in rows if r["method"] not in new] + d["rows"]
    commands.append(d.get("command", "?"))
res = {"rows": rows, "samples": meta["samples"], "steps": meta["steps"], "guidance": meta["guidance"], "weights": meta["weights"],
       "levels": fraction_at_levels(rows), "commands": commands, "joined_from": inputs}
out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
out.with_suffix(".md").write_text(markdown(res))
plot(res, out.with_suffix(".png"))
print(markdown(res))
