"""The demo's reduction software: three steps that follow the container contract
(docs/manifest.md). Each reads its manifest, reads its inputs, and writes its products
under WORKFLOW_OUTPUT_DIR; a non-zero exit fails the run.

    python3 steps.py calibrate   raw spectra ("channel counts" lines) x gain
    python3 steps.py baseline    minus the mean of the line-free edge channels
    python3 steps.py map         the average of a source's spectra, with quality metrics
"""

import json
import math
import os
import sys
from pathlib import Path


def read_spectrum(path):
    return [(int(c), float(v)) for c, v in (line.split() for line in path.read_text().splitlines())]


def write_spectrum(path, spectrum):
    path.write_text("".join(f"{c} {v:.4f}\n" for c, v in spectrum))


def calibrate(manifest, inputs, output):
    gain = manifest["configuration"].get("gain", 1.0)
    for item in manifest["inputs"]:
        raw = Path(item["path"])
        spectrum = [(c, v * gain) for c, v in read_spectrum(raw)]
        write_spectrum(output / (raw.stem.split("_", 1)[1] + ".cal"), spectrum)
    return len(manifest["inputs"])


def baseline(manifest, inputs, output):
    edge = manifest["configuration"].get("line_free_edge_channels", 8)
    for item in manifest["upstream_products"]:
        spectrum = read_spectrum(Path(item["path"]))
        free = spectrum[:edge] + spectrum[-edge:]
        level = sum(v for _, v in free) / len(free)
        name = Path(item["name"]).stem + ".base"
        write_spectrum(output / name, [(c, v - level) for c, v in spectrum])
    return len(manifest["upstream_products"])


def make_map(manifest, inputs, output):
    spectra = [read_spectrum(Path(p["path"])) for p in manifest["upstream_products"]]
    channels = len(spectra[0])
    mean = [(spectra[0][i][0], sum(s[i][1] for s in spectra) / len(spectra)) for i in range(channels)]
    write_spectrum(output / "science" / "map.txt", mean)
    peak_channel, peak = max(mean, key=lambda cv: cv[1])
    noise = [v for _, v in mean[:8]]
    metrics = {
        "spectra": len(spectra),
        "peak": round(peak, 4),
        "peak_channel": peak_channel,
        "rms": round(math.sqrt(sum(v * v for v in noise) / len(noise)), 4),
    }
    (output / "science" / "map.txt.metrics.json").write_text(json.dumps(metrics) + "\n")
    (output / "qa" / "summary.txt").write_text(
        f"map of {manifest['sub_group']['key']} from {len(spectra)} spectra: {json.dumps(metrics)}\n"
    )
    return len(spectra)


STEPS = {"calibrate": calibrate, "baseline": baseline, "map": make_map}


def main():
    step = sys.argv[1]
    manifest = json.loads(Path(os.environ["WORKFLOW_MANIFEST"]).read_text())
    output = Path(os.environ["WORKFLOW_OUTPUT_DIR"])
    output.mkdir(parents=True, exist_ok=True)
    done = STEPS[step](manifest, Path(os.environ["WORKFLOW_INPUT_DIR"]), output)
    if not done:
        sys.exit(f"{step}: nothing to work on in run {manifest['run_id']}")
    print(f"{step}: {done} spectrum/spectra, run {manifest['run_id']} attempt {manifest['attempt']}")


if __name__ == "__main__":
    main()
