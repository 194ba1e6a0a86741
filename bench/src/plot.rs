//! The reports' plots, one colour per configuration:
//! - `benchmark_*.svg` ([`write_svg`]): the latency CDF of every
//!   configuration's run on the left (log latency axis), their throughput
//!   as horizontal bars on the right;
//! - `compare_*.svg` ([`write_scenarios_svg`]): live p95 against offered
//!   load, the frontier (batch throughput against live p95, adaptive
//!   marked) and the mixed run's live latency over time, side by side.
//!
//! `plotters` is built with its SVG backend only: the SVG names a generic
//! `sans-serif` font and text is laid out by estimate, so nothing here
//! needs fontconfig or a font file, and any SVG viewer renders it.

use std::path::Path;

use plotters::prelude::*;

use crate::measure::RunResult;
use crate::scenario::{FrontierPoint, LiveRun, MixedRun};

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

/// Writes the scenarios' plot, under `title`, to `path` (SVG): live p95 by
/// offered load, the frontier (with adaptive's objective, when it ran),
/// and the mixed run's live latency over time.
pub(crate) fn write_scenarios_svg(
    title: &str,
    live: &[LiveRun],
    frontier: &[FrontierPoint],
    objective_ms: Option<f64>,
    mixed: &[MixedRun],
    path: &Path,
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1800, 600)).into_drawing_area();
    draw_scenarios(title, live, frontier, objective_ms, mixed, &root)
        .map_err(|e| anyhow::anyhow!("plot {}: {e}", path.display()))?;
    root.present()
        .map_err(|e| anyhow::anyhow!("plot {}: {e}", path.display()))?;
    Ok(())
}

fn draw_scenarios(
    title: &str,
    live: &[LiveRun],
    frontier: &[FrontierPoint],
    objective_ms: Option<f64>,
    mixed: &[MixedRun],
    root: &Area<'_>,
) -> DrawResult {
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let panels = root.split_evenly((1, 3));
    live_p95(live, &panels[0])?;
    frontier_panel(frontier, objective_ms, &panels[1])?;
    timeline(mixed, &panels[2])
}

/// A log axis's range around positive `values` (a default when none).
fn log_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi > 0.0 {
        (lo * 0.7).max(0.001)..hi * 1.5
    } else {
        0.1..10.0
    }
}

fn legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
}

fn live_p95(runs: &[LiveRun], area: &Area<'_>) -> DrawResult {
    let p95s = runs
        .iter()
        .flat_map(|r| r.steps.iter().filter_map(|s| s.client.latency_ms.p95));
    let y = log_range(p95s);
    let x_hi = runs
        .iter()
        .flat_map(|r| r.steps.iter().map(|s| s.load))
        .fold(0.0, f64::max)
        .max(0.1)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption("live traffic: p95 by offered load", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..x_hi, y.log_scale())?;
    chart
        .configure_mesh()
        .x_label_formatter(&|v| format!("{v:.1}"))
        .y_label_formatter(&|v| short(*v))
        .light_line_style(RGBColor(235, 235, 235))
        .x_desc("offered load (fraction of capacity)")
        .y_desc("p95 latency from arrival (ms, log)")
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .draw()?;
    for (i, run) in runs.iter().enumerate() {
        let c = colour(i);
        let points: Vec<(f64, f64)> = run
            .steps
            .iter()
            .filter_map(|s| s.client.latency_ms.p95.map(|p| (s.load, p)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
            .label(run.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 3, c.filled())))?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)
}

fn frontier_panel(
    points: &[FrontierPoint],
    objective_ms: Option<f64>,
    area: &Area<'_>,
) -> DrawResult {
    let x = log_range(
        points
            .iter()
            .filter_map(FrontierPoint::live_p95)
            .chain(objective_ms),
    );
    let top = points
        .iter()
        .map(|p| p.batch.throughput_rps)
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption("frontier: batch throughput vs live p95", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(x.log_scale(), 0.0..top)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|v| short(*v))
        .y_label_formatter(&|v| short(*v))
        .light_line_style(RGBColor(235, 235, 235))
        .x_desc("live p95 (ms, log)")
        .y_desc("batch throughput (req/s)")
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .draw()?;
    let at = |p: &FrontierPoint| p.live_p95().map(|l| (l, p.batch.throughput_rps));
    let caps: Vec<(f64, f64, usize)> = points
        .iter()
        .filter_map(|p| Some((at(p)?, p.limit?)))
        .map(|((l, r), n)| (l, r, n))
        .collect();
    let c = colour(0);
    chart
        .draw_series(LineSeries::new(
            caps.iter().map(|&(l, r, _)| (l, r)),
            c.stroke_width(2),
        ))?
        .label("concurrency.wasm limit=N")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3)));
    for &(l, r, n) in &caps {
        chart.draw_series([Circle::new((l, r), 4, c.filled())])?;
        chart.draw_series([Text::new(
            format!("{n}"),
            (l, r + top * 0.02),
            ("sans-serif", 12).into_font().color(&BLACK),
        )])?;
    }
    let red = colour(3);
    for (l, r) in points.iter().filter(|p| p.limit.is_none()).filter_map(at) {
        chart
            .draw_series([TriangleMarker::new((l, r), 9, red.filled())])?
            .label("adaptive.wasm")
            .legend(move |(x, y)| TriangleMarker::new((x + 9, y), 6, red.filled()));
    }
    if let Some(objective) = objective_ms {
        let grey = colour(7);
        chart
            .draw_series(LineSeries::new(
                [(objective, 0.0), (objective, top)],
                grey.stroke_width(1),
            ))?
            .label("adaptive's objective")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], grey));
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)
}

fn timeline(runs: &[MixedRun], area: &Area<'_>) -> DrawResult {
    let y = log_range(
        runs.iter()
            .flat_map(|r| r.live_timeline.iter().map(|p| p[1])),
    );
    let x_hi = runs
        .iter()
        .flat_map(|r| r.live_timeline.last().map(|p| p[0]))
        .fold(0.0, f64::max)
        .max(0.01)
        * 1.05;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "mixed: live latency during the batch job",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..x_hi, y.log_scale())?;
    chart
        .configure_mesh()
        .x_label_formatter(&|v| short(*v))
        .y_label_formatter(&|v| short(*v))
        .light_line_style(RGBColor(235, 235, 235))
        .x_desc("arrival (s since the batch started)")
        .y_desc("live latency (ms, log)")
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .draw()?;
    for (i, run) in runs.iter().enumerate() {
        let c = colour(i);
        // At most ~1,500 points a configuration keep the SVG small.
        let stride = run.live_timeline.len().div_ceil(1500).max(1);
        chart
            .draw_series(
                run.live_timeline
                    .iter()
                    .step_by(stride)
                    .map(|p| Circle::new((p[0], p[1]), 2, c.filled())),
            )?
            .label(run.label.clone())
            .legend(move |(x, y)| Circle::new((x + 9, y), 4, c.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}
