//! The latency-by-percentile chart as a hand-written SVG: x is the percentile on a log scale
//! of 1/(1-p) (ticks at 0%, 90%, 99%, 99.9%, ...), y the latency in ms, one polyline per
//! target with a legend. The same picture HdrHistogram's plotter draws, without a charting
//! dependency. It only builds a string.

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

/// The plot's scales: how many nines the x axis shows and the y axis's step and top.
struct Axes {
    nines: u32,
    x_max: f64,
    plot_w: f64,
    plot_h: f64,
    step: f64,
    y_max: f64,
}

impl Axes {
    fn new(series: &[Series], samples_max: u64) -> Axes {
        let nines = ((samples_max.max(1) as f64).log10().ceil() as u32).clamp(NINES_MIN, NINES_MAX);
        let y_top = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0f64, f64::max);
        let step = nice_step(y_top * 1.05);
        Axes {
            nines,
            x_max: f64::from(nines),
            plot_w: WIDTH - LEFT - RIGHT,
            plot_h: HEIGHT - TOP - BOTTOM,
            step,
            y_max: ((y_top * 1.05) / step).ceil().max(1.0) * step,
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
        TOP + self.plot_h - ms / self.y_max * self.plot_h
    }

    fn y_ticks(&self) -> u32 {
        (self.y_max / self.step).round() as u32
    }
}

/// Builds the chart. `samples_max` (the largest histogram's count) sets how many nines the x
/// axis shows: beyond log10(samples) the percentiles say nothing.
pub(super) fn svg(title: &str, subtitle: &str, series: &[Series], samples_max: u64) -> String {
    let axes = Axes::new(series, samples_max);
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
    for i in 0..=axes.y_ticks() {
        let y = axes.y_of(f64::from(i) * axes.step);
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
    let places = decimals(axes.step);
    for i in 0..=axes.y_ticks() {
        let value = f64::from(i) * axes.step;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{value:.places$}</text>"#,
            LEFT - 8.0,
            axes.y_of(value) + 4.0
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
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">Latency (ms)</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
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
        let svg = svg("t", "s & t", &series, 1000);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a&lt;b") && svg.contains("s &amp; t"));
        assert!(svg.contains(">99.9%<") && !svg.contains(">99.99%<"));
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
