"""The current ratios against the peers (benchmarks/RESULTS.md, section "Current figures
against the peers") as one horizontal bar chart on a log scale, written to
benchmarks/ratios.png.

Ratio = the peer's time / spectral_ext's time on the same input in the same run (above 1x
spectral_ext is faster). The table below is copied by hand from RESULTS.md: edit both together.
A ratio given there as a range is drawn at its middle and labelled with the range; the values
marked "~" are computed from the two measured times, as RESULTS.md marks them.

Run: python benchmarks/plot_ratios.py
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (peer, task, ratio drawn, label); the label is the figure as RESULTS.md states it
RATIOS = [
    ("WeightWatcher 0.7.7", "analyze(), VGG11-CIFAR", 2.7, "2.7x"),
    ("WeightWatcher 0.7.7", "analyze(), ResNet-18", 2.6, "2.6x"),
    ("WeightWatcher 0.7.7", "zoo of 1,000 CNNs in memory", 72.4, "72.4x"),
    ("WeightWatcher 0.7.7", "1,000 checkpoints, fresh process", 5.6, "5.6x"),
    ("WeightWatcher 0.7.7", "1,000 checkpoints, one process", 17.0, "17.0x"),
    ("WeightWatcher 0.7.7", "EfficientNet-B4, layer_spectra", 2.5, "2.5x"),
    ("WeightWatcher 0.7.7", "MobileNetV3-Large, layer_spectra", 2.1, "2.1x"),
    ("WeightWatcher 0.7.7", "Qwen2-0.5B folder, drop-in (CPU)", 3.09, "3.09x"),
    ("WeightWatcher 0.7.7", "Qwen2-0.5B folder, layer_spectra (CPU)", 2.20, "2.20x"),
    ("WeightWatcher 0.7.7", "TinyLlama-1.1B folder, drop-in", 3.15, "3.15x"),
    ("WeightWatcher 0.7.7", "16 small-LLaMA checkpoints, zoo", 2.91, "2.91x"),
    ("WeightWatcher 0.7.7", "16 small-LLaMA checkpoints, drop-in", 2.75, "2.75x"),
    ("WeightWatcher 0.7.7", "analyze(pool=False), ResNet-18 (CPU)", 2.58, "2.58x"),
    ("WeightWatcher 0.7.7", "analyze(pool=False), MLP (CPU)", 2.58, "2.58x"),
    ("WeightWatcher 0.7.7", "analyze(fit=TPL), small MLP (CPU)", 1.00, "1.00x"),
    ("WeightWatcher 0.7.7", "SVDSmoothing(), ResNet-18 (CPU)", 1.26, "1.26x"),
    ("WeightWatcher 0.7.7", "SVDSmoothing(), ResNet-18 state_dict (CPU)", 1.44, "1.44x"),
    ("WeightWatcher 0.7.7", "SVDSharpness(), ResNet-18 (CPU)", 17.7, "17.7x"),
    ("WeightWatcher 0.7.7", "distances raw, ResNet-18 pair (CPU)", 3.86, "3.86x"),
    ("WeightWatcher 0.7.7", "distances euclidean (CPU)", 3.16, "3.16x"),
    ("WeightWatcher 0.7.7", "distances cka (CPU)", 1.49, "1.49x"),
    ("WeightWatcher 0.7.7", "analyze(peft=True), adapter folder (CPU)", 3.69, "3.69x"),
    ("WeightWatcher 0.7.7", "analyze(intra=True), MLP (CPU)", 1.11, "1.08-1.14x"),
    ("WeightWatcher 0.7.7", "analyze(), base_model, ResNet-18 (CPU)", 2.41, "2.41x"),
    ("pytorch-cka 1.1.3", "linear CKA, N=2,000", 2.94, "2.94x"),
    ("pytorch-cka 1.1.3", "linear CKA, N=10,000", 17.4, "17.4x"),
    ("pytorch-cka 1.1.3", "RBF CKA (vs its linear)", 0.94, "0.94x"),
    ("pytorch-cka 1.1.3", "G_ReLU CKA (vs its linear)", 0.77, "0.77x"),
    ("pytorch-cka 1.1.3", "ResNet-18 pair, 8 x 8 layers", 0.93, "0.93x"),
    ("pytorch-cka 1.1.3", "ResNet-18 pair, 18 x 18 layers", 0.90, "0.90x"),
    ("pytorch-cka 1.1.3", "zoo K x K, K = 32", 23.6, "23.6x"),
    ("pytorch-cka 1.1.3", "zoo K x K, max_memory=10 MiB", 20.5, "20.5x"),
    ("pytorch-cka 1.1.3", "zoo K x K through zoo.analyze", 9.2, "9.2x"),
    ("pytorch-cka 1.1.3", "README compute_cka", 0.97, "0.96-0.98x"),
    ("pytorch-cka 1.1.3", "CKA-heavy MLP, batches of 64", 0.955, "0.95-0.96x"),
    ("pytorch-cka 1.1.3", "CKA-heavy MLP, batches of 256", 1.09, "1.08-1.10x"),
    ("torch-cka 0.21", "zoo K x K, K = 32", 30.3, "30.3x"),
    ("torch-cka 0.21", "README: ResNet-18/34, 8 layers", 1.3, "1.3x"),
    ("torch-cka 0.21", "README: ResNet-18/34, all layers", 11.4, "11.4x"),
    ("torch-cka 0.21", "README: ResNet-50 vs WideResNet-50", 11.7, "11.7x"),
    ("torch-cka 0.21", "README: ResNet-50 on 2 loaders", 44.9, "44.9x"),
    ("POT 0.9.7.post1", "Sinkhorn 256 x 64x64", 6.9, "6.9x"),
    ("POT 0.9.7.post1", "Sinkhorn 256 x 128x128", 8.5, "8.5x"),
    ("POT 0.9.7.post1", "Sinkhorn 64 x 512x512", 6.4, "6.4x"),
    ("POT 0.9.7.post1", "Sinkhorn log domain 256 x 64x64", 17, "17x"),
    ("POT 0.9.7.post1", "Sinkhorn log domain 256 x 128x128", 21, "21x"),
    ("POT 0.9.7.post1", "Sinkhorn log domain 64 x 512x512", 18, "18x"),
    ("POT 0.9.7.post1", "emd2 64 x 100x100, uniform", 2.9, "2.9x"),
    ("POT 0.9.7.post1", "emd2, random marginals", 2.0, "2.0x"),
    ("POT 0.9.7.post1", "emd2, uniform [0, 1) costs", 2.9, "2.9x"),
    ("POT 0.9.7.post1", "emd2 300x300, costs 1e-8..1e8 (POT 34x off)", 0.45, "0.45x"),
    ("POT 0.9.7.post1", "barycenter sinkhorn, 400x5 / 1000x10", 1.21, "1.10-1.32x"),
    ("POT 0.9.7.post1", "barycenter stabilized, 400x5 / 1000x10", 1.88, "1.57-2.18x"),
    ("POT 0.9.7.post1", "barycenter log, 200x5 / 400x5", 2.68, "2.51-2.84x"),
    ("POT 0.9.7.post1", "convolutional barycenter 50^2 / 100^2", 4.9, "4.37-5.43x"),
    ("POT 0.9.7.post1", "convolutional barycenter, log domain", 2.28, "2.00-2.55x"),
    ("scipy 1.17.1", "assignment 208 x 300x300, random", 4.7, "4.7x"),
    ("scipy 1.17.1", "assignment, weight matching", 2.2, "2.2x"),
    ("scipy 1.17.1", "assignment, integer costs 0-9", 2.1, "2.1x"),
    ("scipy 1.17.1", "assignment, rectangular 300 x 301", 2.35, "2.3-2.4x"),
    ("lapx 0.11.1", "assignment 208 x 300x300, random", 4.1, "4.1x"),
    ("lapx 0.11.1", "assignment, weight matching", 3.8, "3.8x"),
    ("SVR authors' code", "SVR, torchvision VGG11", 6.1, "6.1x"),
    ("SVR authors' code", "SVR, VGG11-CIFAR", 9.6, "9.6x"),
    ("SVR authors' code", "SVR, small VGG-like net", 1.8, "1.8x"),
    ("repsim 0.1.5", "cca, K x K", 4.8, "4.8x"),
    ("repsim 0.1.5", "svcca, K x K", 4.3, "4.3x"),
    ("repsim 0.1.5", "dot_product, K x K", 1.45, "1.45x"),
    ("repsim 0.1.5", "pwcca, K x K", 99, "99x"),
    ("repsim 0.1.5", "cka (rbf), K x K", 170, "170x"),
    ("repsim 0.1.5", "hsic, K x K", 104, "104x"),
    ("repsim 0.1.5", "cca, one pair", 180, "~180x"),
    ("repsim 0.1.5", "pwcca, one pair", 870, "~870x"),
    ("repsim 0.1.5", "cka (rbf), one pair", 25, "~25x"),
    ("repsim 0.1.5", "hsic, one pair", 16, "~16x"),
    ("repsim 0.1.5", "dot_product, one pair", 1.7, "1.7x"),
    ("rsatoolbox 0.3.2", "RDMs + spearman, K x K", 10.2, "10.2x"),
    ("rsatoolbox 0.3.2", "correlation RDMs + spearman, K x K", 11.4, "11.4x"),
    ("rsatoolbox 0.3.2", "the same through compat", 4.07, "4.07x"),
    ("rsatoolbox 0.3.2", "RDMs + spearman, one pair", 2.24, "2.24x"),
    ("netrep 0186b8a", "shape metric alpha=1, K x K", 3.4, "3.4x"),
    ("netrep 0186b8a", "shape metric alpha=0.5, K x K", 7.9, "7.9x"),
    ("netrep 0186b8a", "permutation metric, K x K", 4.6, "4.6x"),
    ("netrep 0186b8a", "alpha=1, one pair", 2.3, "2.3x"),
    ("netrep 0186b8a", "alpha=0.5, one pair", 1.2, "1.2x"),
    ("platonic-rep 07ef02a", "mutual_knn, K x K", 184, "184x"),
    ("platonic-rep 07ef02a", "mutual_knn, one pair", 5.3, "5.3x"),
    ("ReSi f9403bd", "knn_jaccard, K x K", 42, "42x"),
    ("ReSi f9403bd", "knn_jaccard, one pair", 1.8, "1.8x"),
    ("ReSi f9403bd", "second_order_cosine, K x K", 47, "47x"),
    ("ReSi f9403bd", "second_order_cosine, one pair", 2.1, "2.1x"),
    ("ReSi f9403bd", "eigenspace_overlap, K x K", 123, "123x"),
    ("ReSi f9403bd", "eigenspace_overlap, one pair", 6.0, "6.0x"),
    ("ReSi f9403bd", "concentricity_difference, K x K", 62, "62x"),
    ("ReSi f9403bd", "concentricity_difference, one pair", 0.85, "0.85x"),
    ("ReSi f9403bd", "magnitude_difference, K x K", 4.4, "4.4x"),
    ("ReSi f9403bd", "magnitude_difference, one pair", 0.40, "0.40x"),
]


def main(out=Path(__file__).with_name("ratios.png")):
    peers = list(dict.fromkeys(p for p, *_ in RATIOS))
    colours = list(plt.get_cmap("tab10").colors) + [(0.30, 0.30, 0.30), (0.55, 0.45, 0.05)]
    gap = 1.2  # blank rows between two peers' groups
    y, ticks, labels, peer_mid = 0.0, [], [], []
    fig_h = 0.19 * (len(RATIOS) + gap * len(peers)) + 1.2
    fig, ax = plt.subplots(figsize=(11, fig_h))
    for k, peer in enumerate(peers):
        rows = [r for r in RATIOS if r[0] == peer]
        first = y
        for _, task, ratio, label in rows:
            # bars grow from 1x: right when spectral_ext is faster, left when the peer is
            ax.barh(y, ratio - 1.0, left=1.0, height=0.75, color=colours[k], edgecolor="none")
            right = ratio >= 1.0
            ax.text(ratio * (1.06 if right else 0.94), y, label, va="center", ha="left" if right else "right",
                    fontsize=7.5)
            ticks.append(y)
            labels.append(task)
            y += 1
        peer_mid.append((peer, (first + y - 1) / 2, first, y - 1))
        y += gap
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(0.02, 3000)
    ax.set_ylim(y - gap + 0.2, -1.6)
    ax.axvline(1.0, color="black", lw=1.0)
    ax.text(1.0, -1.1, " 1x: as fast as the peer", fontsize=8.5, va="center", ha="left")
    ax.set_xlabel("ratio = peer's time / spectral_ext's time (log scale; above 1x spectral_ext is faster)")
    ax.set_title("spectral_ext against the peers: current ratios (benchmarks/RESULTS.md)", fontsize=11)
    ax.grid(axis="x", which="major", color="0.85", lw=0.6)
    ax.set_axisbelow(True)
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)
    # the peer's name at the right of its group, with a bracket
    for k, (peer, mid, top, bottom) in enumerate(peer_mid):
        ax.annotate(peer, xy=(1.005, mid), xycoords=("axes fraction", "data"), fontsize=8.5,
                    fontweight="bold", color=colours[k], va="center", ha="left",
                    annotation_clip=False)
        ax.plot([1.0, 1.0], [top - 0.4, bottom + 0.4], transform=ax.get_yaxis_transform(), color=colours[k],
                lw=3, clip_on=False, solid_capstyle="butt")
    fig.tight_layout(rect=(0, 0.012, 1, 1))
    fig.text(0.01, 0.004, "~: computed from the two measured times; a range is drawn at its middle. "
             "One thread per side; machines and dates per row in RESULTS.md.", fontsize=7.5, color="0.3",
             va="bottom", ha="left")
    fig.savefig(out, dpi=110)
    print(f"wrote {out} ({len(RATIOS)} bars, {len(peers)} peers)")


if __name__ == "__main__":
    main()
