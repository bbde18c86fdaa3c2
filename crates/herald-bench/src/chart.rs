//! The `--chart` SVG: latency and deliveries over time, and latency by percentile.

use std::path::Path;

use plotters::prelude::*;

use crate::report::{Report, SeriesPoint};

/// Why the chart could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("chart {path}: {reason}")]
pub struct ChartError {
    path: String,
    reason: String,
}

/// Distance of a quantile from 0 in "nines": 0.9 → 1, 0.99 → 2, 1 → 6 (the maximum).
fn nines(q: f64) -> f64 {
    if q >= 1.0 {
        6.0
    } else {
        (-(1.0 - q).log10()).clamp(0.0, 6.0)
    }
}

pub fn write(report: &Report, path: &Path) -> Result<(), ChartError> {
    let fail = |e: &dyn std::fmt::Display| ChartError {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let root = SVGBackend::new(path, (1000, 1050)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let title = format!(
        "{}: {} clients, {} rooms × {}, {} senders, {} msgs/s",
        report.label,
        report.scenario.clients,
        report.scenario.rooms,
        report.scenario.members,
        report.scenario.senders,
        report.scenario.rate
    );
    let root = root
        .titled(&title, ("sans-serif", 20))
        .map_err(|e| fail(&e))?;
    let panels = root.split_evenly((3, 1));
    let series = &report.series;
    let t_max = series.last().map_or(1.0, |p| p.t_s).max(1.0);

    // Latency over time, log scale.
    let lat_max = series
        .iter()
        .map(|p| p.max_ms)
        .fold(1.0f64, f64::max)
        .max(1.0)
        * 1.5;
    let lat_min = series
        .iter()
        .map(|p| p.p50_ms)
        .filter(|v| *v > 0.0)
        .fold(lat_max, f64::min)
        .clamp(0.01, 1.0)
        / 2.0;
    let mut chart = ChartBuilder::on(&panels[0])
        .caption("latency over time (ms, log)", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, (lat_min..lat_max).log_scale())
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("ms")
        .draw()
        .map_err(|e| fail(&e))?;
    type Pick = fn(&SeriesPoint) -> f64;
    let lines: [(&str, RGBColor, Pick); 4] = [
        ("p50", BLUE, |p| p.p50_ms),
        ("p90", GREEN, |p| p.p90_ms),
        ("p99", RGBColor(230, 120, 0), |p| p.p99_ms),
        ("max", RED, |p| p.max_ms),
    ];
    for (name, color, value) in lines {
        chart
            .draw_series(LineSeries::new(
                series
                    .iter()
                    .filter(|p| value(p) > 0.0)
                    .map(|p| (p.t_s, value(p))),
                color.stroke_width(2),
            ))
            .map_err(|e| fail(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(&e))?;

    // Deliveries and publishes per second.
    let rate_max = series
        .iter()
        .map(|p| p.delivered_per_s)
        .fold(1.0f64, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&panels[1])
        .caption("deliveries per second", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..rate_max)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .draw()
        .map_err(|e| fail(&e))?;
    chart
        .draw_series(LineSeries::new(
            series.iter().map(|p| (p.t_s, p.delivered_per_s)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| fail(&e))?
        .label("delivered/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(
            series.iter().map(|p| (p.t_s, p.published_per_s)),
            GREEN.stroke_width(2),
        ))
        .map_err(|e| fail(&e))?
        .label("published/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(&e))?;

    // Latency by percentile.
    let spectrum = &report.spectrum;
    let s_max = spectrum.iter().map(|p| p.latency_ms).fold(1.0f64, f64::max) * 1.5;
    let s_min = spectrum
        .first()
        .map_or(0.01, |p| p.latency_ms)
        .clamp(0.01, 1.0)
        / 2.0;
    let mut chart = ChartBuilder::on(&panels[2])
        .caption(
            "latency by percentile (ms, log; x: 0 = p0, 1 = p90, 2 = p99, 3 = p99.9 … 6 = max)",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..6.0, (s_min..s_max).log_scale())
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("nines")
        .y_desc("ms")
        .draw()
        .map_err(|e| fail(&e))?;
    chart
        .draw_series(LineSeries::new(
            spectrum
                .iter()
                .filter(|p| p.latency_ms > 0.0)
                .map(|p| (nines(p.quantile), p.latency_ms)),
            RED.stroke_width(2),
        ))
        .map_err(|e| fail(&e))?;
    if let Some(cross) = &report.cross_instance_latency {
        chart
            .draw_series(std::iter::once(Text::new(
                format!("cross-instance p99 {:.2} ms", cross.p99_ms),
                (0.2, s_max / 2.0),
                ("sans-serif", 14),
            )))
            .map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::nines;

    #[test]
    fn nines_scale() {
        assert!((nines(0.0) - 0.0).abs() < 1e-9);
        assert!((nines(0.9) - 1.0).abs() < 1e-9);
        assert!((nines(0.999) - 3.0).abs() < 1e-9);
        assert!((nines(1.0) - 6.0).abs() < 1e-9);
    }
}
