"""The README's Python API example, run as written, and checked: two editors of 10 requests each
(the second loaded from the first's save) against one editor of all 20.

    python scripts/api_example.py [--config configs/smollm2-135m/encore.yaml] [--out my-edits]

Prints the scores and the largest difference between the two edited models' weights (<= 1e-6).
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import encore_pl  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact-easyedit-splits" / "counterfact-edit.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2-135m/encore.yaml")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--out", default=None, help="where to save the first editor (default: a temporary directory)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="encore-api-")

    # The README example.
    model, tokenizer = encore_pl.load_model("smollm2-135m", dtype="float32")
    config = encore_pl.EditorConfig.from_yaml(args.config)
    requests = encore_pl.load_requests(args.data, format="easyedit", num_edits=20)
    editor = encore_pl.Editor(model, tokenizer, config)
    editor.edit(requests[:10], batch_size=10)
    print("after 10 edits:", editor.evaluate(requests[:10]))
    editor.save(out)
    model2, tokenizer2 = encore_pl.load_model("smollm2-135m")
    later = encore_pl.Editor.load(out, model2, tokenizer2)
    later.edit(requests[10:], batch_size=10)
    print("after 20 edits (continued):", later.evaluate(requests))

    # One editor of all 20, for comparison.
    model3, tokenizer3 = encore_pl.load_model("smollm2-135m")
    one = encore_pl.Editor(model3, tokenizer3, config)
    one.edit(requests, batch_size=10)
    diff = max((later.lm.weight_out_in(l) - one.lm.weight_out_in(l)).abs().max().item() for l in one.layers)
    print(f"largest weight difference, saved + loaded + continued vs one editor: {diff:.3g}")
    model4, _ = encore_pl.load_model("smollm2-135m")
    encore_pl.apply_patch(model4, Path(out) / "edits.safetensors")
    print(f"patch of the first 10 applied to a fresh model: {out}/edits.safetensors")
    if diff > 1e-6:
        raise SystemExit("the continued editor differs from one editor")


if __name__ == "__main__":
    main()
