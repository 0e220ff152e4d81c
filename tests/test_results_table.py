"""--collect's results.md: the columns a researcher compares (the axes that vary, state, loss, headline metrics in
one format each), with every other field left to results.csv / results.json."""

from __future__ import annotations

from ditscale import results


def test_markdown_shows_the_compared_columns():
    table = []
    for w, gap, acc in (("global", 1.2345, 0.81234), ("local@head", 0.9, 0.9)):
        row = {"run": f"r-{w}", "state": "done", "step": 800, "loss": 0.123456, "images_per_second": 30.0}
        row.update({"axis.windows": w, "axis.n": 30, "variant": "DiT-XXS/2", "windows": w})
        row.update({"psnr_gap.avg_gap": gap, "psnr_gap.avg_train_psnr": 16.0, "psnr_gap.avg_test_psnr": 14.0})
        row.update(
            {"fid_classifier.fid": 12.3456, "fid_classifier.sample_accuracy": acc, "fid_classifier.samples": 500}
        )
        row.update({f"psnr_gap.extra{i}": i for i in range(40)})  # the 50 flattened fields a reader should not see
        row["run_dir"] = "/runs/x"
        table.append(row)
    md = results.to_markdown(table).splitlines()
    assert md[0] == (
        "| run | state | step | windows | loss | PSNR gap (dB) | train PSNR (dB) | test PSNR (dB) | classifier FID "
        "| samples classified as drawn |"
    )  # axis.n and variant are the same in every run; windows is an axis
    assert md[2] == "| r-global | done | 800 | global | 0.1235 | 1.23 | 16.00 | 14.00 | 12.35 | 81.2% |"
    assert md[-1] == "45 more fields per run in results.csv / results.json."
    assert "psnr_gap.extra7" in results.to_csv(table)  # nothing is lost
