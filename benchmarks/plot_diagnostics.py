"""Plots AnoSeg's training diagnostics of several runs side by side, for docs/.

  python benchmarks/plot_diagnostics.py --out=docs/anoseg_diagnostics.png \
      'row 2=runs/row2' 'row 3=runs/row3:row3_separation.json'

Each argument is LABEL=WORKDIR, optionally :SEPARATION_JSON (written by
benchmarks/synthetic_separation.py --every-checkpoint --json). Panels: the
norm of the gradient each weighted loss term sends to the shared encoder
(`encoder_grad_<term>` of metrics.jsonl, from runs with
`--config.diagnostics=True`), the discriminator's accuracy on real and fake
pairs, and the map's pixel AUROC on synthetic anomalies per checkpoint.
"""

import argparse
import json
import os

from matplotlib.figure import Figure

_TERMS = ('segmentation', 'reconstruction', 'adversarial')
_STYLES = ('-', '--', ':', '-.')


def _records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [r for r in map(json.loads, f) if r.get('stage') == 1]


def main(runs: list[str], out: str) -> None:
  figure = Figure(figsize=(15, 4.2))
  gradients, accuracy, separation = figure.subplots(1, 3)
  for index, run in enumerate(runs):
    label, location = run.split('=', 1)
    workdir, _, separation_file = location.partition(':')
    style = _STYLES[index % len(_STYLES)]
    records = _records(workdir)
    for term in _TERMS:
      key = f'encoder_grad_{term}'
      points = [(r['step'], r[key]) for r in records if key in r and r[key] > 0]
      if points:
        gradients.plot(*zip(*points), style, label=f'{label}: {term}')
    for pair in ('real', 'fake'):
      key = f'discriminator_{pair}_accuracy'
      points = [(r['step'], r[key]) for r in records if key in r]
      if points:
        accuracy.plot(*zip(*points), style, label=f'{label}: {pair}')
    if separation_file:
      with open(separation_file, encoding='utf-8') as f:
        rows = json.load(f)['rows']
      separation.plot([r['step'] for r in rows], [r['synthetic_pixel_auroc'] for r in rows],
                      style, marker='o', label=label)
  gradients.set(yscale='log', xlabel='step', title='gradient norm on the shared encoder')
  accuracy.set(ylim=(-0.02, 1.02), xlabel='step', title='discriminator accuracy')
  separation.set(ylim=(0.4, 1.0), xlabel='step',
                 title='pixel AUROC on synthetic anomalies')
  for axes in (gradients, accuracy, separation):
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
      axes.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(out, dpi=110)
  print(f'wrote {out}')


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('runs', nargs='+')
  parser.add_argument('--out', required=True)
  arguments = parser.parse_args()
  main(arguments.runs, arguments.out)
