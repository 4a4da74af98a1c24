//! `--plot FILE.svg`: bus bandwidth against message size, both axes
//! logarithmic, one line per collective. Plain SVG written by hand: no
//! fonts to embed, readable in a browser and by `rsvg-convert`.

use std::fmt::Write as _;

/// One collective's points: (bytes, busbw in GB/s).
pub struct Series {
    pub coll: &'static str,
    pub points: Vec<(u64, f64)>,
    /// Said after the name in the legend (barrier's time: it has no size).
    pub note: Option<String>,
}

const W: f64 = 860.0;
const H: f64 = 520.0;
/// Plot area: left, top, right, bottom edges.
const L: f64 = 90.0;
const T: f64 = 50.0;
const R: f64 = 680.0;
const B: f64 = 450.0;
/// Distinguishable on white, in print and for the common colour-blindness
/// (Okabe and Ito's palette).
const COLOURS: [&str; 8] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
];
const DASHES: [&str; 2] = ["", "6 3"];

/// A size as a person reads it: 4 B, 64 KiB, 16 MiB, 1 GiB.
pub fn size_label(b: u64) -> String {
    let units = [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (u, name) in units {
        if b >= u && b.is_multiple_of(u) {
            return format!("{} {name}", b / u);
        }
    }
    format!("{b} B")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The SVG document. `title` names the run (ranks, type, device).
pub fn svg(title: &str, series: &[Series]) -> String {
    let pts: Vec<(u64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|&(b, bw)| b > 0 && bw > 0.0 && bw.is_finite())
        .collect();
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"#
    );
    let _ = writeln!(o, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="28" font-size="16" text-anchor="middle">{}</text>"#,
        (L + R) / 2.0,
        esc(title)
    );
    // Axis titles, with units.
    let _ = writeln!(
        o,
        r#"<text class="axis-title" x="{}" y="{}" font-size="14" text-anchor="middle">message size (bytes, log scale)</text>"#,
        (L + R) / 2.0,
        B + 48.0
    );
    let _ = writeln!(
        o,
        r#"<text class="axis-title" x="24" y="{y}" font-size="14" text-anchor="middle" transform="rotate(-90 24 {y})">bus bandwidth (GB/s, log scale)</text>"#,
        y = (T + B) / 2.0
    );
    let _ = writeln!(
        o,
        r##"<rect x="{L}" y="{T}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        R - L,
        B - T
    );
    if pts.is_empty() {
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" font-size="14" text-anchor="middle">no sized rows to plot (barrier has no size)</text>"#,
            (L + R) / 2.0,
            (T + B) / 2.0
        );
        o.push_str("</svg>\n");
        return o;
    }
    // x: log2 of the size, whole powers of two at the ends.
    let lx = |b: u64| (b as f64).log2();
    let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, z), &(b, _)| {
        (a.min(lx(b).floor()), z.max(lx(b).ceil()))
    });
    let x1 = if x1 <= x0 { x0 + 1.0 } else { x1 };
    // y: log10 of busbw, whole decades at the ends.
    let (y0, y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, z), &(_, bw)| {
        (a.min(bw.log10().floor()), z.max(bw.log10().ceil()))
    });
    let y1 = if y1 <= y0 { y0 + 1.0 } else { y1 };
    let px = |b: u64| L + (lx(b) - x0) / (x1 - x0) * (R - L);
    let py = |bw: f64| B - (bw.log10() - y0) / (y1 - y0) * (B - T);

    // x ticks: every power of two, labelled so that labels do not crowd.
    let span = (x1 - x0) as u64;
    let every = span.div_ceil(10).max(1);
    for (i, e) in (x0 as u64..=x1 as u64).enumerate() {
        let x = L + (e as f64 - x0) / (x1 - x0) * (R - L);
        let _ = writeln!(
            o,
            r##"<line x1="{x:.1}" y1="{B}" x2="{x:.1}" y2="{}" stroke="#444"/>"##,
            B + 5.0
        );
        if (i as u64).is_multiple_of(every) {
            let _ = writeln!(
                o,
                r##"<line x1="{x:.1}" y1="{T}" x2="{x:.1}" y2="{B}" stroke="#ddd"/>"##
            );
            let _ = writeln!(
                o,
                r#"<text x="{x:.1}" y="{}" font-size="12" text-anchor="middle">{}</text>"#,
                B + 22.0,
                size_label(1u64 << e)
            );
        }
    }
    // y ticks: decades, and 2 and 5 times them when the range is short.
    let decades = (y1 - y0) as i32;
    for d in y0 as i32..=y1 as i32 {
        for m in [1.0, 2.0, 5.0] {
            if m > 1.0 && (d == y1 as i32 || decades > 3) {
                continue;
            }
            let v = m * 10f64.powi(d);
            let y = py(v);
            let grid = if m == 1.0 { "#ccc" } else { "#eee" };
            let _ = writeln!(
                o,
                r#"<line x1="{L}" y1="{y:.1}" x2="{R}" y2="{y:.1}" stroke="{grid}"/>"#
            );
            let _ = writeln!(
                o,
                r#"<text x="{}" y="{:.1}" font-size="12" text-anchor="end">{}</text>"#,
                L - 8.0,
                y + 4.0,
                bw_label(v)
            );
        }
    }
    // One line per collective, with a legend entry each.
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let dash = DASHES[(i / COLOURS.len()) % DASHES.len()];
        let line: Vec<String> = s
            .points
            .iter()
            .filter(|&&(b, bw)| b > 0 && bw > 0.0 && bw.is_finite())
            .map(|&(b, bw)| format!("{:.1},{:.1}", px(b), py(bw)))
            .collect();
        if !line.is_empty() {
            let _ = writeln!(
                o,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
                line.join(" ")
            );
            for p in &line {
                let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(o, r#"<circle cx="{x}" cy="{y}" r="3" fill="{colour}"/>"#);
            }
        }
        let ly = T + 10.0 + 34.0 * i as f64;
        let _ = writeln!(
            o,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
            R + 16.0,
            R + 46.0
        );
        let _ = writeln!(
            o,
            r#"<text class="legend" x="{}" y="{}" font-size="13">{}</text>"#,
            R + 54.0,
            ly + 4.5,
            esc(s.coll)
        );
        if let Some(n) = &s.note {
            let _ = writeln!(
                o,
                r#"<text x="{}" y="{}" font-size="11">{}</text>"#,
                R + 54.0,
                ly + 18.0,
                esc(n)
            );
        }
    }
    o.push_str("</svg>\n");
    o
}

fn bw_label(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        // 0.5, 0.01, 0.002: as many decimals as the value needs.
        let places = (-v.log10()).ceil().max(1.0) as usize;
        format!("{v:.places$}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> String {
        let s = |coll, k: f64| Series {
            coll,
            points: (3..=27)
                .step_by(2)
                .map(|e| (1u64 << e, k * (1u64 << e) as f64 / 1e7))
                .collect(),
            note: None,
        };
        svg(
            "collbench: 4 ranks, float, host memory",
            &[
                s("allreduce", 1.0),
                s("allgather", 0.5),
                Series {
                    coll: "barrier",
                    points: vec![(0, 0.0)],
                    note: Some("12.5 us, no size".into()),
                },
            ],
        )
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(size_label(4), "4 B");
        assert_eq!(size_label(65536), "64 KiB");
        assert_eq!(size_label(3 << 20), "3 MiB");
        assert_eq!(size_label(1 << 30), "1 GiB");
        assert_eq!(size_label(1536), "1536 B");
        assert_eq!(bw_label(0.02), "0.02");
        assert_eq!(bw_label(10.0), "10");
    }

    #[test]
    fn the_plot_has_titles_with_units_a_legend_entry_per_collective_and_readable_text() {
        let s = demo();
        assert!(s.contains("message size (bytes"), "{s}");
        assert!(s.contains("bus bandwidth (GB/s"), "{s}");
        assert_eq!(s.matches(r#"class="legend""#).count(), 3, "one entry each");
        for c in ["allreduce", "allgather", "barrier"] {
            assert!(s.contains(&format!(">{c}</text>")), "{c}");
        }
        assert_eq!(s.matches("<polyline").count(), 2, "barrier has no line");
        let sizes: Vec<f64> = s
            .split("font-size=\"")
            .skip(1)
            .map(|t| t.split('"').next().unwrap().parse().unwrap())
            .collect();
        assert!(
            sizes.len() > 10 && sizes.iter().all(|&f| f >= 10.0),
            "{sizes:?}"
        );
        assert!(!s.contains("NaN") && !s.contains("inf"));
    }

    #[test]
    fn nothing_to_plot_still_gives_a_valid_document() {
        let s = svg("t", &[]);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("no sized rows"));
    }
}
