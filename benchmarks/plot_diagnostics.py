"""Plots the training diagnostics of AnoSeg or UTAD runs side by side, for docs/.

  python benchmarks/plot_diagnostics.py --out=docs/anoseg_diagnostics.png \
      'row 2=runs/row2' 'row 3=runs/row3:row3_separation.json'

Each argument is LABEL=WORKDIR, optionally :SEPARATION_JSON (written by
benchmarks/synthetic_separation.py --every-checkpoint --json). From the
stage-1 records of metrics.jsonl of runs with `--config.diagnostics=True`,
three panels: the gradient norms (AnoSeg's `encoder_grad_<term>`, UTAD's
`grad_<part>_<term>`), the accuracies of the discriminator or of UTAD's
statistics network T (`*_accuracy`), and per checkpoint the map's pixel
AUROC on synthetic anomalies where a separation file is given, else UTAD's
code variances (`code_variance_*`).
"""

import argparse
import json
import os

from matplotlib.figure import Figure

_STYLES = ('-', '--', ':', '-.')


def _records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [r for r in map(json.loads, f) if r.get('stage') == 1]


def _curves(axes, records, label, style, keep) -> None:
  """One line per metrics key that `keep` accepts."""
  for key in sorted({k for r in records for k in r if keep(k)}):
    points = [(r['step'], r[key]) for r in records if key in r]
    if points:
      axes.plot(*zip(*points), style, label=f'{label}: {key}')


def main(runs: list[str], out: str) -> None:
  figure = Figure(figsize=(15, 4.2))
  gradients, accuracy, third = figure.subplots(1, 3)
  separations = False
  for index, run in enumerate(runs):
    label, location = run.split('=', 1)
    workdir, _, separation_file = location.partition(':')
    style = _STYLES[index % len(_STYLES)]
    records = _records(workdir)
    _curves(gradients, [{k: v for k, v in r.items() if not ('grad' in k and v <= 0)}
                        for r in records], label, style,
            lambda k: k.startswith(('encoder_grad_', 'grad_')))
    _curves(accuracy, records, label, style, lambda k: k.endswith('_accuracy'))
    if separation_file:
      separations = True
      with open(separation_file, encoding='utf-8') as f:
        rows = json.load(f)['rows']
      third.plot([r['step'] for r in rows], [r['synthetic_pixel_auroc'] for r in rows],
                 style, marker='o', label=label)
    else:
      _curves(third, records, label, style, lambda k: k.startswith('code_variance_'))
  gradients.set(yscale='log', xlabel='step', title='gradient norms')
  accuracy.set(ylim=(-0.02, 1.02), xlabel='step', title='accuracy on real/joint and fake/marginal')
  if separations:
    third.set(ylim=(0.4, 1.0), xlabel='step', title='pixel AUROC on synthetic anomalies')
  else:
    third.set(yscale='log', xlabel='step', title='code variance')
  for axes in (gradients, accuracy, third):
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
