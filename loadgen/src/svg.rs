//! The percentile spectrum chart, as hand-written SVG.
//!
//! Like HdrHistogram's plotter: the x axis is the percentile on a logarithmic `1/(1-p)` scale
//! from 0 % to 99.999 %, so the tail gets as much room as the body; the y axis is the latency
//! in µs, linear from 0. One polyline per series.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

/// One curve.
#[derive(Debug, Clone, Copy)]
pub struct Series<'a> {
    /// Its legend.
    pub label: &'a str,
    /// Latencies in µs.
    pub histogram: &'a Histogram<u64>,
}

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 500.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
/// Decades on the x axis: 1/(1-p) from 10^0 (0 %) to 10^5 (99.999 %).
const DECADES: f64 = 5.0;
const COLORS: [&str; 4] = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"];
const X_LABELS: [&str; 6] = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"];

/// The chart of `series` under `title`.
pub fn percentile_spectrum(title: &str, series: &[Series<'_>]) -> String {
    let curves: Vec<Vec<(f64, f64)>> = series.iter().map(|s| points(s.histogram)).collect();
    let highest = curves.iter().flatten().map(|&(_, y)| y).fold(0.0, f64::max);
    let y_max = nice_ceiling(highest);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x_of = |decades: f64| LEFT + decades / DECADES * plot_w;
    let y_of = |us: f64| TOP + plot_h - us / y_max * plot_h;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="16">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    // Grid and axes.
    for (i, label) in X_LABELS.iter().enumerate() {
        let x = x_of(i as f64);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            TOP + plot_h
        );
        let _ = writeln!(
            svg,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            TOP + plot_h + 18.0
        );
    }
    for i in 0..=5 {
        let us = y_max * f64::from(i) / 5.0;
        let y = y_of(us);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/>"##,
            LEFT + plot_w
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            format_us(us)
        );
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w:.1}" height="{plot_h:.1}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 14.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">latency (µs)</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    // Curves and legend.
    for (i, (s, curve)) in series.iter().zip(&curves).enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut path = String::new();
        for &(x, y) in curve {
            let _ = write!(path, "{:.1},{:.1} ", x_of(x), y_of(y));
        }
        let _ = writeln!(
            svg,
            r#"<polyline class="series" data-label="{}" fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            escape(s.label),
            path.trim_end()
        );
        let legend_y = TOP + 18.0 + 18.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{:.1}" y1="{legend_y:.1}" x2="{:.1}" y2="{legend_y:.1}" stroke="{color}" stroke-width="3"/>"#,
            LEFT + 12.0,
            LEFT + 36.0
        );
        let h = s.histogram;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}">{}: p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs</text>"#,
            LEFT + 42.0,
            legend_y + 4.0,
            escape(s.label),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max()
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The curve of `h`: (decades of 1/(1-p), µs), from the percentile iteration, the last point
/// (p = 100 %) placed at the right edge.
fn points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    for v in h.iter_quantiles(5) {
        let q = v.quantile_iterated_to();
        let decades = if q >= 1.0 {
            DECADES
        } else {
            (1.0 / (1.0 - q)).log10().min(DECADES)
        };
        out.push((decades, v.value_iterated_to() as f64));
        if decades >= DECADES {
            break;
        }
    }
    out
}

/// The smallest 1, 2 or 5 times a power of ten at or above `v` (at least 1).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 1.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * magnitude)
}

fn format_us(us: f64) -> String {
    if us.fract() == 0.0 && us < 1e15 {
        crate::units::thousands(us as u64)
    } else if us.fract() == 0.0 {
        format!("{us:.0}")
    } else {
        format!("{us:.1}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caller::new_histogram;

    fn histogram(scale: u64) -> Histogram<u64> {
        let mut h = new_histogram();
        for v in 1..=10_000u64 {
            h.record(v * scale).unwrap();
        }
        h
    }

    #[test]
    fn compare_charts_have_two_labelled_series() {
        let (g, d) = (histogram(3), histogram(1));
        let svg = percentile_spectrum(
            "gateway vs direct",
            &[
                Series {
                    label: "gateway",
                    histogram: &g,
                },
                Series {
                    label: "direct",
                    histogram: &d,
                },
            ],
        );
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline class=\"series\"").count(), 2);
        assert!(svg.contains("data-label=\"gateway\""));
        assert!(svg.contains("data-label=\"direct\""));
        assert!(svg.contains(">99.999%<"));
        // Both curves end at the right edge of the plot.
        for line in svg.lines().filter(|l| l.contains("<polyline")) {
            let points = line.split("points=\"").nth(1).unwrap();
            let last = points
                .trim_end_matches("\"/>")
                .split(' ')
                .next_back()
                .unwrap();
            let x: f64 = last.split(',').next().unwrap().parse().unwrap();
            assert_eq!(x, WIDTH - RIGHT);
        }
    }

    #[test]
    fn axis_ceilings_are_round() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(7.0), 10.0);
        assert_eq!(nice_ceiling(120.0), 200.0);
        assert_eq!(nice_ceiling(450.0), 500.0);
        assert_eq!(nice_ceiling(1000.0), 1000.0);
        assert_eq!(nice_ceiling(1001.0), 2000.0);
    }

    #[test]
    fn an_empty_histogram_draws_no_points_but_a_valid_chart() {
        let h = new_histogram();
        let svg = percentile_spectrum(
            "empty",
            &[Series {
                label: "x<y",
                histogram: &h,
            }],
        );
        assert!(svg.contains("data-label=\"x&lt;y\""));
        assert!(!svg.contains("NaN"));
    }
}
