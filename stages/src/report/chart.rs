//! Line charts as inline SVG: axes with round tick values, one polyline per series and
//! a legend. Text is SVG `<text>`, so no font file is needed, and the output is a pure
//! function of the data (reports diff cleanly and tests can count points).

use std::fmt::Write as _;

/// One line: a label for the legend and its (x, y) points in drawing order.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

const WIDTH: f64 = 440.0;
const HEIGHT: f64 = 260.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 40.0;
/// Colour-blind-safe palette (Okabe–Ito).
const COLOURS: [&str; 7] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
];

/// An SVG line chart of `series` (non-finite points are dropped). Each series becomes
/// one `<polyline class="series" data-points="N" points="x,y ...">`.
pub fn line_chart(title: &str, x_label: &str, series: &[Series]) -> String {
    let series: Vec<Series> = series
        .iter()
        .map(|s| Series {
            label: s.label.clone(),
            points: s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect::<Vec<_>>(),
        })
        .map(|s| Series {
            points: thin(&s.points),
            label: s.label,
        })
        .collect();
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .collect();
    let (x_ticks, x_range) = axis(all.iter().map(|p| p.0));
    let (y_ticks, y_range) = axis(all.iter().map(|p| p.1));
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let to_x = |x: f64| LEFT + (x - x_range.0) / (x_range.1 - x_range.0) * plot_w;
    let to_y = |y: f64| TOP + plot_h - (y - y_range.0) / (y_range.1 - y_range.0) * plot_h;

    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{t}">"#,
        t = escape(title)
    );
    let _ = write!(
        svg,
        r#"<text x="{}" y="18" class="title" text-anchor="middle">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    let _ = write!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>"##
    );
    for tick in &y_ticks {
        let y = to_y(*tick);
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{:.2}" y1="{y:.2}" y2="{y:.2}" stroke="#e4e4e4"/><text x="{:.2}" y="{:.2}" class="tick" text-anchor="end">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0,
            format_number(*tick)
        );
    }
    for tick in &x_ticks {
        let x = to_x(*tick);
        let _ = write!(
            svg,
            r##"<line x1="{x:.2}" x2="{x:.2}" y1="{TOP}" y2="{:.2}" stroke="#e4e4e4"/><text x="{x:.2}" y="{:.2}" class="tick" text-anchor="middle">{}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 16.0,
            format_number(*tick)
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{:.2}" y="{:.2}" class="axis" text-anchor="middle">{}</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 6.0,
        escape(x_label)
    );
    for (index, s) in series.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let points: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.2},{:.2}", to_x(x), to_y(y)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline class="series" data-label="{}" data-points="{}" fill="none" stroke="{colour}" stroke-width="1.8" points="{}"/>"#,
            escape(&s.label),
            points.len(),
            points.join(" ")
        );
        if s.points.len() <= 40 {
            for &(x, y) in &s.points {
                let _ = write!(
                    svg,
                    r#"<circle cx="{:.2}" cy="{:.2}" r="2.4" fill="{colour}"/>"#,
                    to_x(x),
                    to_y(y)
                );
            }
        }
        if series.len() > 1 {
            let y = TOP + 14.0 + index as f64 * 14.0;
            let _ = write!(
                svg,
                r#"<rect x="{:.2}" y="{:.2}" width="10" height="3" fill="{colour}"/><text x="{:.2}" y="{:.2}" class="legend">{}</text>"#,
                LEFT + 8.0,
                y - 4.0,
                LEFT + 22.0,
                y,
                escape(&s.label)
            );
        }
    }
    if all.is_empty() {
        let _ = write!(
            svg,
            r#"<text x="{:.2}" y="{:.2}" class="axis" text-anchor="middle">no finite values</text>"#,
            LEFT + plot_w / 2.0,
            TOP + plot_h / 2.0
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Most vertices a polyline gets: a long run is thinned to every k-th point (the last
/// always kept), which keeps the page small and looks the same at chart size.
pub const MAX_VERTICES: usize = 1500;

fn thin(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    if points.len() <= MAX_VERTICES {
        return points.to_vec();
    }
    let stride = points.len().div_ceil(MAX_VERTICES - 1);
    let mut kept: Vec<(f64, f64)> = points.iter().copied().step_by(stride).collect();
    if let (Some(last), Some(kept_last)) = (points.last(), kept.last()) {
        if last != kept_last {
            kept.push(*last);
        }
    }
    kept
}

/// Round tick values covering the data, and the axis range they span.
fn axis(values: impl Iterator<Item = f64>) -> (Vec<f64>, (f64, f64)) {
    let (mut low, mut high) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
        (l.min(v), h.max(v))
    });
    if !low.is_finite() || !high.is_finite() {
        (low, high) = (0.0, 1.0);
    }
    if high - low <= f64::EPSILON * high.abs().max(1.0) {
        let pad = if low == 0.0 { 1.0 } else { low.abs() * 0.1 };
        (low, high) = (low - pad, high + pad);
    }
    let step = nice_step((high - low) / 5.0);
    let first = (low / step).floor() * step;
    let last = (high / step).ceil() * step;
    let count = ((last - first) / step).round() as usize;
    let ticks = (0..=count).map(|i| first + i as f64 * step).collect();
    (ticks, (first, last))
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
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

/// A compact label: plain decimals in [1e-3, 1e5), scientific notation outside.
pub fn format_number(value: f64) -> String {
    if value == 0.0 {
        return "0".into();
    }
    let magnitude = value.abs();
    if !(1e-3..1e5).contains(&magnitude) {
        return format!("{value:.2e}");
    }
    let text = format!("{value:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    text.to_string()
}

/// Escapes text for HTML and SVG content and attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_finite_point_becomes_one_polyline_vertex() {
        let series = Series {
            label: "loss".into(),
            points: vec![(0.0, 3.0), (1.0, f64::NAN), (2.0, 1.0), (3.0, 0.5)],
        };
        let svg = line_chart("loss", "step", &[series]);
        assert!(svg.contains(r#"data-points="3""#), "{svg}");
        let points = svg
            .split(r#" points=""#)
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(points.split(' ').count(), 3);
    }

    #[test]
    fn long_runs_are_thinned_keeping_the_first_and_last_points() {
        let points: Vec<(f64, f64)> = (0..100_000).map(|i| (i as f64, (i % 7) as f64)).collect();
        let kept = thin(&points);
        assert!(kept.len() <= MAX_VERTICES, "{}", kept.len());
        assert_eq!(kept.first(), points.first());
        assert_eq!(kept.last(), points.last());
        assert_eq!(
            thin(&points[..10]),
            points[..10].to_vec(),
            "short runs are untouched"
        );
    }

    #[test]
    fn ticks_are_round_and_cover_the_data() {
        let (ticks, range) = axis([0.13, 0.97].into_iter());
        assert_eq!(range, (0.0, 1.0));
        assert_eq!(ticks.len(), 6);
        let (_, flat) = axis([2.0, 2.0].into_iter());
        assert!(
            flat.0 < 2.0 && flat.1 > 2.0,
            "a constant series still gets a range"
        );
    }

    #[test]
    fn labels_are_compact_and_text_is_escaped() {
        assert_eq!(format_number(0.25), "0.25");
        assert_eq!(format_number(3e-5), "3.00e-5");
        assert_eq!(format_number(200.0), "200");
        assert_eq!(escape("<a & \"b\">"), "&lt;a &amp; &quot;b&quot;&gt;");
    }
}
