//! The benchmark's PNG chart: two horizontal bar panels, sessions/s (median, with a min–max
//! whisker) and p99 session latency, one bar per contender.
//!
//! Text uses plotters' ab_glyph renderer with DejaVu Sans (fonts-dejavu-core), so no system
//! font library is linked; without the font file the bars are drawn without text.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::bench::BenchResults;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> bool {
    let Ok(bytes) = std::fs::read(FONT) else {
        return false;
    };
    // plotters keeps fonts for the life of the process; the chart is drawn once per run.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
}

pub fn draw(res: &BenchResults, path: &Path) -> Result<()> {
    let text = register_font();
    let n = res.contenders.len().max(1);
    let height = 120 + 44 * n as u32;
    let root = BitMapBackend::new(path, (1400, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("chart: {e}"))?;
    let root = if text {
        root.titled(
            &format!(
                "SMTP sessions through each contender ({} x {} sessions, {} parallel, {} B, {} CPUs)",
                res.rounds, res.sessions_per_run, res.concurrency, res.message_size, res.machine.cpus
            ),
            ("sans-serif", 22),
        )
        .map_err(|e| anyhow!("chart: {e}"))?
    } else {
        root
    };
    let panels = root.split_evenly((1, 2));
    let rates: Vec<(f64, f64, f64)> = res
        .contenders
        .iter()
        .map(|c| {
            (
                c.median_sessions_per_s,
                c.min_sessions_per_s,
                c.max_sessions_per_s,
            )
        })
        .collect();
    let p99: Vec<(f64, f64, f64)> = res
        .contenders
        .iter()
        .map(|c| (c.median_p99_ms, c.median_p99_ms, c.median_p99_ms))
        .collect();
    let names: Vec<String> = res.contenders.iter().map(|c| c.name.clone()).collect();
    panel(
        &panels[0],
        "sessions/s (median, min–max)",
        &names,
        &rates,
        RGBColor(46, 110, 180),
        text,
        0,
    )?;
    panel(
        &panels[1],
        "p99 session latency (ms, median of rounds)",
        &names,
        &p99,
        RGBColor(200, 110, 40),
        text,
        2,
    )?;
    root.present()
        .map_err(|e| anyhow!("chart: writing {}: {e}", path.display()))?;
    Ok(())
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    names: &[String],
    values: &[(f64, f64, f64)],
    color: RGBColor,
    text: bool,
    decimals: usize,
) -> Result<()> {
    let max = values
        .iter()
        .map(|v| v.2.max(v.0))
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.15;
    let n = names.len().max(1) as f64;
    let mut builder = ChartBuilder::on(area);
    builder
        .margin(15)
        .x_label_area_size(if text { 30 } else { 0 });
    if text {
        builder.caption(caption, ("sans-serif", 18));
    }
    let mut chart = builder
        .build_cartesian_2d(0.0..max, 0.0..n)
        .map_err(|e| anyhow!("chart: {e}"))?;
    if text {
        chart
            .configure_mesh()
            .disable_y_mesh()
            .disable_y_axis()
            .x_labels(6)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| anyhow!("chart: {e}"))?;
    }
    for (i, ((median, lo, hi), name)) in values.iter().zip(names).enumerate() {
        // Top to bottom in table order.
        let y = n - i as f64 - 1.0;
        let fill = if name.starts_with("switchyard") {
            color.filled()
        } else {
            color.mix(0.45).filled()
        };
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, y + 0.15), (*median, y + 0.85)],
                fill,
            )))
            .map_err(|e| anyhow!("chart: {e}"))?;
        if hi > lo {
            let whisker = ShapeStyle::from(&BLACK).stroke_width(2);
            chart
                .draw_series([
                    PathElement::new(vec![(*lo, y + 0.5), (*hi, y + 0.5)], whisker),
                    PathElement::new(vec![(*lo, y + 0.35), (*lo, y + 0.65)], whisker),
                    PathElement::new(vec![(*hi, y + 0.35), (*hi, y + 0.65)], whisker),
                ])
                .map_err(|e| anyhow!("chart: {e}"))?;
        }
        if text {
            let label = format!("{name}  {median:.decimals$}");
            chart
                .draw_series(std::iter::once(Text::new(
                    label,
                    (max * 0.01, y + 0.62),
                    ("sans-serif", 14).into_font().color(&BLACK),
                )))
                .map_err(|e| anyhow!("chart: {e}"))?;
        }
    }
    Ok(())
}
