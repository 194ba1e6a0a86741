//! The report's plot (`benchmark_*.svg`): the latency CDF of every
//! configuration's run on the left (log latency axis), their throughput as
//! horizontal bars on the right, one colour per configuration.
//!
//! `plotters` is built with its SVG backend only: the SVG names a generic
//! `sans-serif` font and text is laid out by estimate, so nothing here
//! needs fontconfig or a font file, and any SVG viewer renders it.

use std::path::Path;

use plotters::prelude::*;

use crate::measure::RunResult;

const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Writes the plot of `runs`, under `title`, to `path` (SVG).
pub(crate) fn write_svg(title: &str, runs: &[RunResult], path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1400, 560)).into_drawing_area();
    draw(title, runs, &root).map_err(|e| anyhow::anyhow!("plot {}: {e}", path.display()))?;
    root.present()
        .map_err(|e| anyhow::anyhow!("plot {}: {e}", path.display()))?;
    Ok(())
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

fn draw(title: &str, runs: &[RunResult], root: &Area<'_>) -> DrawResult {
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (left, right) = root.split_horizontally(760);
    cdf(runs, &left)?;
    bars(runs, &right)
}

/// `0.25`, `3`, `1200`: few digits, none wasted.
fn short(v: f64) -> String {
    if v >= 10.0 || v == v.round() {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

fn cdf(runs: &[RunResult], area: &Area<'_>) -> DrawResult {
    let points = runs.iter().flat_map(|r| &r.client.latency_cdf_ms);
    let (lo, hi) = points.fold((f64::MAX, 0.0f64), |(lo, hi), p| {
        (lo.min(p[1]), hi.max(p[1]))
    });
    let (lo, hi) = if hi > 0.0 {
        ((lo * 0.8).max(0.001), hi * 1.25)
    } else {
        (0.1, 10.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption("latency CDF (client side)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_labels(12)
        .x_label_formatter(&|v| short(*v))
        .light_line_style(RGBColor(235, 235, 235))
        .x_desc("latency (ms, log scale)")
        .y_desc("fraction of requests")
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .draw()?;
    for (i, run) in runs.iter().enumerate() {
        let c = colour(i);
        chart
            .draw_series(LineSeries::new(
                run.client.latency_cdf_ms.iter().map(|p| (p[1], p[0])),
                c.stroke_width(2),
            ))?
            .label(run.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
}

fn bars(runs: &[RunResult], area: &Area<'_>) -> DrawResult {
    let n = runs.len().max(1);
    let top = runs
        .iter()
        .map(|r| r.client.throughput_rps)
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption("throughput (req/s)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(20)
        .build_cartesian_2d(0.0..top, 0.0..n as f64)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_label_formatter(&|v| short(*v))
        .light_line_style(RGBColor(235, 235, 235))
        .x_desc("successful requests per second")
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .draw()?;
    for (i, run) in runs.iter().enumerate() {
        // First configuration at the top.
        let y = (n - 1 - i) as f64;
        let v = run.client.throughput_rps;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(0.0, y + 0.1), (v, y + 0.65)],
            colour(i).filled(),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{} — {v:.0}", run.label),
            (top * 0.01, y + 0.95),
            ("sans-serif", 13).into_font().color(&BLACK),
        )))?;
    }
    Ok(())
}
