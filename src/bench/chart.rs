//! The latency-by-percentile chart as a hand-written SVG: x is the percentile on a log scale
//! of 1/(1-p) (ticks at 0%, 90%, 99%, 99.9%, ...), y the latency in ms, linear or logarithmic
//! (`--latency-axis log`: ticks at powers of ten, so a 0.1 ms target and a 50 ms one are both
//! readable instead of the fast one lying flat on zero), one polyline per target with a
//! legend. The same picture HdrHistogram's plotter draws, without a charting dependency. It
//! only builds a string.

use std::fmt::Write as _;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 540.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 70.0;
const BOTTOM: f64 = 70.0;
/// Colours per target, in order (distinguishable for the common colour blindnesses).
const PALETTE: [&str; 6] = [
    "#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9",
];
/// The x axis never shows fewer than 2 or more than 6 nines.
const NINES_MIN: u32 = 2;
const NINES_MAX: u32 = 6;

/// How the latency axis is scaled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LatencyAxis {
    /// From 0 to the highest latency, in round steps.
    #[default]
    Linear,
    /// Powers of ten from below the lowest latency to above the highest.
    Log,
}

pub(super) struct Series {
    pub label: String,
    /// (quantile in 0..=1, latency ms), quantiles ascending.
    pub points: Vec<(f64, f64)>,
}

/// Escapes text for XML/HTML content and attribute values.
pub(super) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// "0%", "90%", "99%", "99.9%", ... for `nines` = 0, 1, 2, 3, ...
fn percentile_label(nines: u32) -> String {
    match nines {
        0 => "0%".to_string(),
        1 => "90%".to_string(),
        2 => "99%".to_string(),
        n => format!("99.{}%", "9".repeat(n as usize - 2)),
    }
}

/// A round step (1, 2 or 5 times a power of ten) giving about five ticks up to `max`.
fn nice_step(max: f64) -> f64 {
    let raw = (max / 5.0).max(1e-3);
    let magnitude = 10f64.powf(raw.log10().floor());
    let fraction = raw / magnitude;
    let nice = if fraction <= 1.0 {
        1.0
    } else if fraction <= 2.0 {
        2.0
    } else if fraction <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// Decimal places that show `step` exactly (0.005 → 3).
fn decimals(step: f64) -> usize {
    (-step.log10().floor()).max(0.0) as usize
}

/// The plot's scales: how many nines the x axis shows and the latency axis.
struct Axes {
    nines: u32,
    x_max: f64,
    plot_w: f64,
    plot_h: f64,
    y: YAxis,
}

/// The latency axis: a linear one from 0 by `step` to `max`, or a logarithmic one over the
/// decades 10^`low` ..= 10^`high` (ms).
enum YAxis {
    Linear { step: f64, max: f64 },
    Log { low: i32, high: i32 },
}

impl YAxis {
    fn new(series: &[Series], kind: LatencyAxis) -> YAxis {
        let values = || series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
        let y_top = values().fold(0.0f64, f64::max);
        match kind {
            LatencyAxis::Linear => {
                let step = nice_step(y_top * 1.05);
                YAxis::Linear {
                    step,
                    max: ((y_top * 1.05) / step).ceil().max(1.0) * step,
                }
            }
            LatencyAxis::Log => {
                // Histograms record whole microseconds: nothing is below 0.001 ms, and a
                // zero (an empty histogram) sits on the bottom edge.
                let y_low = values()
                    .filter(|v| *v > 0.0)
                    .fold(f64::INFINITY, f64::min)
                    .max(1e-3);
                let low = if y_low.is_finite() {
                    y_low.log10().floor() as i32
                } else {
                    -3
                };
                let high = (y_top.max(1e-3).log10().ceil() as i32).max(low + 1);
                YAxis::Log { low, high }
            }
        }
    }

    /// Tick values in ms, bottom to top.
    fn ticks(&self) -> Vec<f64> {
        match *self {
            YAxis::Linear { step, max } => {
                let n = (max / step).round() as u32;
                (0..=n).map(|i| f64::from(i) * step).collect()
            }
            YAxis::Log { low, high } => (low..=high).map(|e| 10f64.powi(e)).collect(),
        }
    }

    /// A tick's label: as many decimals as the step (linear) or the decade (log) needs.
    fn label(&self, value: f64) -> String {
        let places = match *self {
            YAxis::Linear { step, .. } => decimals(step),
            YAxis::Log { .. } => decimals(value),
        };
        format!("{value:.places$}")
    }

    /// Where `ms` falls, 0.0 at the bottom and 1.0 at the top.
    fn fraction(&self, ms: f64) -> f64 {
        match *self {
            YAxis::Linear { max, .. } => ms / max,
            YAxis::Log { low, high } => {
                let decades = f64::from(high - low);
                ((ms.max(10f64.powi(low)).log10() - f64::from(low)) / decades).clamp(0.0, 1.0)
            }
        }
    }

    fn title(&self) -> &'static str {
        match self {
            YAxis::Linear { .. } => "Latency (ms)",
            YAxis::Log { .. } => "Latency (ms, log scale)",
        }
    }
}

impl Axes {
    fn new(series: &[Series], samples_max: u64, latency_axis: LatencyAxis) -> Axes {
        let nines = ((samples_max.max(1) as f64).log10().ceil() as u32).clamp(NINES_MIN, NINES_MAX);
        Axes {
            nines,
            x_max: f64::from(nines),
            plot_w: WIDTH - LEFT - RIGHT,
            plot_h: HEIGHT - TOP - BOTTOM,
            y: YAxis::new(series, latency_axis),
        }
    }

    fn x_of(&self, quantile: f64) -> f64 {
        // Quantile 1.0 (the max) sits at the right edge.
        let x = if quantile >= 1.0 {
            self.x_max
        } else {
            (1.0 / (1.0 - quantile)).log10().min(self.x_max)
        };
        LEFT + x / self.x_max * self.plot_w
    }

    /// The x of the tick at `nines` nines.
    fn x_of_tick(&self, nines: u32) -> f64 {
        LEFT + f64::from(nines) / self.x_max * self.plot_w
    }

    fn y_of(&self, ms: f64) -> f64 {
        TOP + self.plot_h - self.y.fraction(ms) * self.plot_h
    }
}

/// Builds the chart. `samples_max` (the largest histogram's count) sets how many nines the x
/// axis shows: beyond log10(samples) the percentiles say nothing.
pub(super) fn svg(
    title: &str,
    subtitle: &str,
    series: &[Series],
    samples_max: u64,
    latency_axis: LatencyAxis,
) -> String {
    let axes = Axes::new(series, samples_max, latency_axis);
    let mut out = String::new();
    write_header(&mut out, title, subtitle);
    write_grid(&mut out, &axes);
    write_tick_labels(&mut out, &axes);
    write_frame(&mut out, &axes);
    write_lines(&mut out, &axes, series);
    write_legend(&mut out, series);
    out.push_str("</svg>\n");
    out
}

/// The `<svg>` opening, the white background, the title and the subtitle.
fn write_header(out: &mut String, title: &str, subtitle: &str) {
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r##"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="18" font-weight="bold">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    let _ = writeln!(
        out,
        r##"<text x="{}" y="48" text-anchor="middle" fill="#555555">{}</text>"##,
        WIDTH / 2.0,
        escape(subtitle)
    );
}

/// The grey grid lines, one per tick on each axis.
fn write_grid(out: &mut String, axes: &Axes) {
    out.push_str(r##"<g stroke="#dddddd" stroke-width="1">"##);
    out.push('\n');
    for n in 0..=axes.nines {
        let x = axes.x_of_tick(n);
        let _ = writeln!(
            out,
            r#"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}"/>"#,
            TOP + axes.plot_h
        );
    }
    for value in axes.y.ticks() {
        let y = axes.y_of(value);
        let _ = writeln!(
            out,
            r#"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}"/>"#,
            LEFT + axes.plot_w
        );
    }
    out.push_str("</g>\n");
}

/// The percentile labels under the x axis and the latency labels left of the y axis.
fn write_tick_labels(out: &mut String, axes: &Axes) {
    for n in 0..=axes.nines {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            axes.x_of_tick(n),
            TOP + axes.plot_h + 18.0,
            percentile_label(n)
        );
    }
    for value in axes.y.ticks() {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end" class="y-tick">{}</text>"#,
            LEFT - 8.0,
            axes.y_of(value) + 4.0,
            axes.y.label(value)
        );
    }
}

/// The plot's border and the two axis titles.
fn write_frame(out: &mut String, axes: &Axes) {
    let (plot_w, plot_h) = (axes.plot_w, axes.plot_h);
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888888"/>"##
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">Percentile</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 20.0
    );
    let _ = writeln!(
        out,
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">{}</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        axes.y.title()
    );
}

/// One polyline per target.
fn write_lines(out: &mut String, axes: &Axes, series: &[Series]) {
    for (s, colour) in series.iter().zip(PALETTE.iter().cycle()) {
        let mut points = String::new();
        for &(q, ms) in &s.points {
            let _ = write!(points, "{:.1},{:.1} ", axes.x_of(q), axes.y_of(ms));
        }
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"><title>{}</title></polyline>"#,
            points.trim_end(),
            escape(&s.label)
        );
    }
}

/// The legend, top left inside the plot (the lines rise to the right).
fn write_legend(out: &mut String, series: &[Series]) {
    for (i, (s, colour)) in series.iter().zip(PALETTE.iter().cycle()).enumerate() {
        let y = TOP + 20.0 + i as f64 * 20.0;
        let _ = writeln!(
            out,
            r#"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{colour}" stroke-width="3"/>"#,
            LEFT + 15.0,
            LEFT + 45.0
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            LEFT + 52.0,
            y + 4.0,
            escape(&s.label)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_polyline_per_series_and_escaped_labels() {
        let series = vec![
            Series {
                label: "a<b".into(),
                points: vec![(0.0, 0.1), (0.9, 0.5), (0.99, 1.0), (1.0, 3.0)],
            },
            Series {
                label: "shadow".into(),
                points: vec![(0.0, 0.2), (1.0, 2.0)],
            },
        ];
        let svg = svg("t", "s & t", &series, 1000, LatencyAxis::Linear);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a&lt;b") && svg.contains("s &amp; t"));
        assert!(svg.contains(">99.9%<") && !svg.contains(">99.99%<"));
    }

    /// The y of every point of the `index`th polyline.
    fn polyline_ys(svg: &str, index: usize) -> Vec<f64> {
        let line = svg.split("<polyline").nth(index + 1).expect("polyline");
        let points = line
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        points
            .split_whitespace()
            .map(|p| p.split(',').nth(1).unwrap().parse().unwrap())
            .collect()
    }

    fn y_tick_labels(svg: &str) -> Vec<String> {
        svg.split(r#"class="y-tick">"#)
            .skip(1)
            .map(|rest| rest.split('<').next().unwrap().to_string())
            .collect()
    }

    /// A fast target (0.04 to 0.2 ms) beside a slow one (5 to 80 ms), as in the demo.
    fn fast_and_slow() -> Vec<Series> {
        vec![
            Series {
                label: "primary".into(),
                points: vec![(0.0, 0.04), (0.5, 0.06), (0.99, 0.12), (1.0, 0.2)],
            },
            Series {
                label: "shadow".into(),
                points: vec![(0.0, 5.0), (0.5, 9.0), (0.99, 40.0), (1.0, 80.0)],
            },
        ]
    }

    #[test]
    fn log_axis_ticks_are_powers_of_ten_around_the_data() {
        let svg = svg("t", "s", &fast_and_slow(), 1000, LatencyAxis::Log);
        let labels = y_tick_labels(&svg);
        assert_eq!(labels, ["0.01", "0.1", "1", "10", "100"]);
        for label in &labels {
            let exponent = label.parse::<f64>().unwrap().log10();
            assert!((exponent - exponent.round()).abs() < 1e-9, "{label}");
        }
        assert!(svg.contains("Latency (ms, log scale)"));
        // Equal ratios, equal distances: 0.01 → 0.1 as far as 10 → 100.
        let axes = Axes::new(&fast_and_slow(), 1000, LatencyAxis::Log);
        let decade = axes.y_of(0.01) - axes.y_of(0.1);
        assert!((decade - (axes.y_of(10.0) - axes.y_of(100.0))).abs() < 1e-9);
        assert!((decade * 4.0 - axes.plot_h).abs() < 1e-9);
    }

    #[test]
    fn the_fast_curve_is_flat_on_a_linear_axis_and_readable_on_a_log_one() {
        let spread = |axis| {
            let ys = polyline_ys(&svg("t", "s", &fast_and_slow(), 1000, axis), 0);
            let lowest = ys.iter().copied().fold(f64::MIN, f64::max);
            let highest = ys.iter().copied().fold(f64::MAX, f64::min);
            lowest - highest
        };
        // Pixels between the fast target's p0 and max.
        assert!(spread(LatencyAxis::Linear) < 2.0);
        assert!(spread(LatencyAxis::Log) > 30.0);
        let linear = svg("t", "s", &fast_and_slow(), 1000, LatencyAxis::Linear);
        assert_eq!(y_tick_labels(&linear)[0], "0");
        assert!(linear.contains(">Latency (ms)<"));
    }

    #[test]
    fn log_axis_of_one_decade_or_an_empty_histogram() {
        let one = vec![Series {
            label: "a".into(),
            points: vec![(0.0, 2.0), (1.0, 3.0)],
        }];
        assert_eq!(
            y_tick_labels(&svg("t", "s", &one, 10, LatencyAxis::Log)),
            ["1", "10"]
        );
        let empty = vec![Series {
            label: "a".into(),
            points: vec![(0.0, 0.0), (1.0, 0.0)],
        }];
        let svg = svg("t", "s", &empty, 0, LatencyAxis::Log);
        assert_eq!(y_tick_labels(&svg), ["0.001", "0.01"]);
        // Zero sits on the bottom edge.
        assert!(
            polyline_ys(&svg, 0)
                .iter()
                .all(|y| (*y - (TOP + (HEIGHT - TOP - BOTTOM))).abs() < 0.1)
        );
    }

    #[test]
    fn ticks() {
        assert_eq!(nice_step(10.0), 2.0);
        assert_eq!(nice_step(0.9), 0.2);
        assert_eq!(decimals(0.2), 1);
        assert_eq!(decimals(5.0), 0);
        assert_eq!(percentile_label(4), "99.99%");
    }
}
