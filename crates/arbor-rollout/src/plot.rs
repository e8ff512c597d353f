//! Small SVG charts for reports and learning curves.
//!
//! Three chart kinds cover what run reports and training logs need: line
//! charts with several series (learning curves, CDFs), grouped bar charts
//! (pass rate per domain and scaffold, failure counts) and histograms
//! (reward, duration). Each is plain data plus [`Chart::to_svg`] /
//! [`Chart::save`], so callers build them without touching `plotters`.
//!
//! Only the `plotters` SVG backend is used: SVG carries text as `<text>`
//! elements that the viewer renders, so no font files or system font
//! libraries are needed at build or run time (text extents for layout are
//! estimated). Non-finite values are dropped rather than failing a report.

use std::ops::Range;
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Why a chart could not be drawn or written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// `plotters` failed while laying out or drawing.
    #[error("drawing chart {title:?}: {message}")]
    Draw { title: String, message: String },
    /// The chart's data cannot be drawn (mismatched lengths, nothing finite).
    #[error("chart {title:?}: {message}")]
    Invalid { title: String, message: String },
    /// Writing the SVG file failed (the cause is in the message, not a
    /// `source`, so error chains do not print it twice).
    #[error("writing {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Pixel size of every chart unless the chart says otherwise.
pub const DEFAULT_SIZE: (u32, u32) = (800, 480);

/// Font sizes (`plotters` scales them down by about 1/1.24 in SVG).
const TITLE_FONT: (&str, u32) = ("sans-serif", 26);
const LABEL_FONT: (&str, u32) = ("sans-serif", 16);
const DESC_FONT: (&str, u32) = ("sans-serif", 18);

/// Tableau-10: distinguishable series colours that stay readable on white.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The colour of series/group number `i` (cycles after ten).
pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Something that renders to a standalone SVG document.
pub trait Chart {
    /// The chart title (used in errors too).
    fn title(&self) -> &str;

    /// Renders the chart as an SVG document (starts with `<svg`).
    fn to_svg(&self) -> Result<String, PlotError>;

    /// Renders and writes the chart to `path`, creating parent directories.
    /// Written through a temporary file and a rename, so a reader never sees
    /// half a plot while a report is regenerated.
    fn save(&self, path: &Path) -> Result<(), PlotError> {
        let svg = self.to_svg()?;
        write_atomic(path, svg.as_bytes()).map_err(|error| PlotError::Io {
            path: path.to_path_buf(),
            error,
        })
    }
}

/// Writes `bytes` to `path` via `path.tmp` + rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// One named line of a [`LineChart`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    pub name: String,
    /// (x, y) points, drawn in the given order.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
        }
    }
}

/// A line chart with several series and a legend (learning curves, CDFs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Fixed x range; `None` fits the data.
    pub x_range: Option<(f64, f64)>,
    /// Fixed y range; `None` fits the data (with a little headroom).
    pub y_range: Option<(f64, f64)>,
    /// Draw each series as a staircase (right-continuous), as a CDF should be.
    pub step: bool,
    /// Pixel size; `None` is [`DEFAULT_SIZE`].
    pub size: Option<(u32, u32)>,
}

/// One group of bars of a [`BarChart`]: one value per category.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BarGroup {
    pub name: String,
    /// `values[i]` belongs to `categories[i]`; a non-finite value draws no bar.
    pub values: Vec<f64>,
}

/// A bar chart over named categories; several groups give grouped bars
/// (e.g. pass rate per domain, one bar per scaffold).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BarChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub categories: Vec<String>,
    pub groups: Vec<BarGroup>,
    /// Fixed y range; `None` is 0 to the largest value plus headroom.
    pub y_range: Option<(f64, f64)>,
    /// Print each bar's value above it, with this many decimals.
    pub value_labels: Option<usize>,
    pub size: Option<(u32, u32)>,
}

/// A histogram of raw values, binned evenly.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub values: Vec<f64>,
    /// Number of bins (at least 1).
    pub bins: usize,
    /// Binned range; `None` is the data's min..max. Values outside are
    /// clamped into the first/last bin so nothing silently disappears.
    pub range: Option<(f64, f64)>,
    pub size: Option<(u32, u32)>,
}

/// One histogram bin: `[lo, hi)` (the last bin includes `hi`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bin {
    pub lo: f64,
    pub hi: f64,
    pub count: usize,
}

/// Bins the finite `values` into `bins` equal-width bins over `range` (or the
/// data's span). Values outside the range go to the nearest end bin. An empty
/// span (all values equal) becomes a unit-wide range around the value.
pub fn bin(values: &[f64], bins: usize, range: Option<(f64, f64)>) -> Vec<Bin> {
    let bins = bins.max(1);
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let (mut lo, mut hi) = match range {
        Some(r) => r,
        None => finite
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            }),
    };
    if !lo.is_finite() || !hi.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi <= lo {
        (lo, hi) = (lo - 0.5, lo + 0.5);
    }
    let width = (hi - lo) / bins as f64;
    let mut out: Vec<Bin> = (0..bins)
        .map(|i| Bin {
            lo: lo + width * i as f64,
            hi: if i + 1 == bins {
                hi
            } else {
                lo + width * (i + 1) as f64
            },
            count: 0,
        })
        .collect();
    for v in finite {
        let i = ((v - lo) / width).floor();
        let i = if i < 0.0 {
            0
        } else {
            (i as usize).min(bins - 1)
        };
        out[i].count += 1;
    }
    out
}

/// Empirical CDF points of `values` for a step [`LineChart`]: (v_i, i/n),
/// sorted, starting at (min, 0) so the first step is visible.
pub fn cdf_points(values: &[f64]) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let mut out = Vec::with_capacity(v.len() + 1);
    if let Some(&first) = v.first() {
        out.push((first, 0.0));
    }
    for (i, x) in v.iter().enumerate() {
        out.push((*x, (i + 1) as f64 / n));
    }
    out
}

fn draw_err(title: &str) -> impl Fn(String) -> PlotError + '_ {
    move |message| PlotError::Draw {
        title: title.to_string(),
        message,
    }
}

/// A range that `plotters` can draw: finite, non-empty, padded by `pad` of
/// its span on each side.
fn fit(lo: f64, hi: f64, pad: f64) -> Range<f64> {
    let (lo, hi) = if lo.is_finite() && hi.is_finite() {
        (lo, hi)
    } else {
        (0.0, 1.0)
    };
    if hi <= lo {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - d)..(hi + d);
    }
    let span = hi - lo;
    (lo - span * pad)..(hi + span * pad)
}

/// Draws `body` on a fresh SVG canvas and returns the document.
fn render(
    title: &str,
    size: Option<(u32, u32)>,
    body: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> Result<(), String>,
) -> Result<String, PlotError> {
    let mut buf = String::new();
    {
        let root =
            SVGBackend::with_string(&mut buf, size.unwrap_or(DEFAULT_SIZE)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| e.to_string())
            .map_err(draw_err(title))?;
        body(&root).map_err(draw_err(title))?;
        root.present()
            .map_err(|e| e.to_string())
            .map_err(draw_err(title))?;
    }
    Ok(buf)
}

impl Chart for LineChart {
    fn title(&self) -> &str {
        &self.title
    }

    fn to_svg(&self) -> Result<String, PlotError> {
        let series: Vec<(&str, Vec<(f64, f64)>)> = self
            .series
            .iter()
            .map(|s| {
                let pts: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .copied()
                    .filter(|(x, y)| x.is_finite() && y.is_finite())
                    .collect();
                let pts = if self.step { staircase(&pts) } else { pts };
                (s.name.as_str(), pts)
            })
            .collect();
        let all = series.iter().flat_map(|(_, p)| p.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        );
        for &(x, y) in all {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        let xr = match self.x_range {
            Some((a, b)) => fit(a, b, 0.0),
            None => fit(x0, x1, 0.02),
        };
        let yr = match self.y_range {
            Some((a, b)) => fit(a, b, 0.0),
            None => fit(y0, y1, 0.05),
        };
        let named = series.iter().any(|(n, _)| !n.is_empty());
        render(&self.title, self.size, |root| {
            let mut chart = ChartBuilder::on(root)
                .caption(&self.title, TITLE_FONT)
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(xr, yr)
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .label_style(LABEL_FONT)
                .axis_desc_style(DESC_FONT)
                .x_desc(&self.x_label)
                .y_desc(&self.y_label)
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(|e| e.to_string())?;
            for (i, (name, pts)) in series.iter().enumerate() {
                let c = color(i);
                let drawn = chart
                    .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
                    .map_err(|e| e.to_string())?;
                if !name.is_empty() {
                    drawn.label(*name).legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                    });
                }
            }
            if named {
                chart
                    .configure_series_labels()
                    .label_font(LABEL_FONT)
                    .position(SeriesLabelPosition::LowerRight)
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .draw()
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })
    }
}

/// Turns sorted points into a right-continuous staircase.
fn staircase(pts: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(pts.len() * 2);
    for (i, &(x, y)) in pts.iter().enumerate() {
        if i > 0 {
            out.push((x, pts[i - 1].1));
        }
        out.push((x, y));
    }
    out
}

/// Category axis: category `i` is centred on `i` (the axis spans
/// `-0.5..n-0.5`) with ticks only at the centres, so every category gets its
/// label whatever the count. (`plotters`' `with_key_points` over an `f64`
/// range loses the label formatter, hence this small axis of our own.)
struct CategoryAxis {
    n: usize,
}

impl Ranged for CategoryAxis {
    type ValueType = f64;
    type FormatOption = DefaultFormatting;

    fn map(&self, &v: &f64, limit: (i32, i32)) -> i32 {
        let n = self.n.max(1) as f64;
        let frac = (v + 0.5) / n;
        limit.0 + (frac * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            return Vec::new();
        }
        (0..self.n).map(|i| i as f64).collect()
    }

    fn range(&self) -> Range<f64> {
        -0.5..self.n.max(1) as f64 - 0.5
    }
}

/// Label of the category whose centre is at `x` (key points are exact integers).
fn category_label(categories: &[String], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() > 1e-6 || i < 0.0 {
        return String::new();
    }
    categories.get(i as usize).cloned().unwrap_or_default()
}

impl Chart for BarChart {
    fn title(&self) -> &str {
        &self.title
    }

    fn to_svg(&self) -> Result<String, PlotError> {
        let n = self.categories.len();
        if let Some(g) = self.groups.iter().find(|g| g.values.len() != n) {
            return Err(PlotError::Invalid {
                title: self.title.clone(),
                message: format!(
                    "group {:?} has {} values for {n} categories",
                    g.name,
                    g.values.len()
                ),
            });
        }
        let max = self
            .groups
            .iter()
            .flat_map(|g| g.values.iter().copied())
            .filter(|v| v.is_finite())
            .fold(0.0_f64, f64::max);
        let min = self
            .groups
            .iter()
            .flat_map(|g| g.values.iter().copied())
            .filter(|v| v.is_finite())
            .fold(0.0_f64, f64::min);
        let yr = match self.y_range {
            Some((a, b)) => fit(a, b, 0.0),
            None => {
                let top = if max > 0.0 { max * 1.12 } else { 1.0 };
                fit(min, top, 0.0)
            }
        };
        let groups = self.groups.len().max(1);
        // Bars of one category share 80% of its slot.
        let width = 0.8 / groups as f64;
        let multi = self.groups.len() > 1;
        let label_style = TextStyle::from(LABEL_FONT)
            .pos(Pos::new(HPos::Center, VPos::Bottom))
            .color(&BLACK);
        render(&self.title, self.size, |root| {
            let mut chart = ChartBuilder::on(root)
                .caption(&self.title, TITLE_FONT)
                .margin(12)
                .x_label_area_size(45)
                .y_label_area_size(60)
                .build_cartesian_2d(CategoryAxis { n }, yr)
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .label_style(LABEL_FONT)
                .axis_desc_style(DESC_FONT)
                .disable_x_mesh()
                .x_desc(&self.x_label)
                .y_desc(&self.y_label)
                .x_label_formatter(&|x| category_label(&self.categories, *x))
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(|e| e.to_string())?;
            for (gi, g) in self.groups.iter().enumerate() {
                let c = color(gi);
                let left = |i: usize| i as f64 - 0.4 + width * gi as f64;
                let bars = g
                    .values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(i, &v)| {
                        Rectangle::new([(left(i), 0.0), (left(i) + width, v)], c.filled())
                    });
                let drawn = chart.draw_series(bars).map_err(|e| e.to_string())?;
                if multi {
                    drawn.label(g.name.as_str()).legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled())
                    });
                }
                if let Some(decimals) = self.value_labels {
                    let texts = g
                        .values
                        .iter()
                        .enumerate()
                        .filter(|(_, v)| v.is_finite())
                        .map(|(i, &v)| {
                            Text::new(
                                format!("{v:.decimals$}"),
                                (left(i) + width / 2.0, v.max(0.0)),
                                label_style.clone(),
                            )
                        });
                    chart.draw_series(texts).map_err(|e| e.to_string())?;
                }
            }
            if multi {
                chart
                    .configure_series_labels()
                    .label_font(LABEL_FONT)
                    .position(SeriesLabelPosition::UpperRight)
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .draw()
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })
    }
}

impl Chart for Histogram {
    fn title(&self) -> &str {
        &self.title
    }

    fn to_svg(&self) -> Result<String, PlotError> {
        let bins = bin(&self.values, self.bins, self.range);
        let (lo, hi) = match (bins.first(), bins.last()) {
            (Some(a), Some(b)) => (a.lo, b.hi),
            _ => (0.0, 1.0),
        };
        let top = bins.iter().map(|b| b.count).max().unwrap_or(0).max(1) as f64;
        let c = color(0);
        render(&self.title, self.size, |root| {
            let mut chart = ChartBuilder::on(root)
                .caption(&self.title, TITLE_FONT)
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(lo..hi, 0.0..top * 1.1)
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .label_style(LABEL_FONT)
                .axis_desc_style(DESC_FONT)
                .disable_x_mesh()
                .x_desc(&self.x_label)
                .y_desc(&self.y_label)
                .y_label_formatter(&|y| {
                    if (y - y.round()).abs() < 1e-9 {
                        format!("{y:.0}")
                    } else {
                        String::new()
                    }
                })
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(bins.iter().filter(|b| b.count > 0).map(|b| {
                    let mut r = Rectangle::new([(b.lo, 0.0), (b.hi, b.count as f64)], c.filled());
                    r.set_margin(0, 0, 1, 1);
                    r
                }))
                .map_err(|e| e.to_string())?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_cover_every_finite_value() {
        let b = bin(&[0.0, 0.1, 0.5, 1.0, f64::NAN, 2.0], 4, Some((0.0, 1.0)));
        assert_eq!(b.len(), 4);
        assert_eq!(b.iter().map(|b| b.count).sum::<usize>(), 5);
        assert_eq!(b[0].count, 2);
        assert_eq!(b[2].count, 1);
        assert_eq!(b[3].count, 2, "1.0 is in the closed last bin, 2.0 clamped");
    }

    #[test]
    fn constant_values_get_a_range() {
        let b = bin(&[3.0, 3.0], 2, None);
        assert!(b[0].lo < 3.0 && b[1].hi > 3.0);
        assert_eq!(b.iter().map(|b| b.count).sum::<usize>(), 2);
    }

    #[test]
    fn cdf_ends_at_one() {
        let p = cdf_points(&[3.0, 1.0, 2.0]);
        assert_eq!(
            p,
            vec![(1.0, 0.0), (1.0, 1.0 / 3.0), (2.0, 2.0 / 3.0), (3.0, 1.0)]
        );
    }

    #[test]
    fn charts_render_svg() {
        let line = LineChart {
            title: "curve".into(),
            series: vec![
                Series::new("a", vec![(0.0, 1.0), (1.0, 2.0)]),
                Series::new("b <&>", vec![(0.0, 0.5), (1.0, f64::NAN)]),
            ],
            ..Default::default()
        };
        let svg = line.to_svg().unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        assert!(svg.contains("b &lt;&amp;&gt;"));
        let bars = BarChart {
            title: "bars".into(),
            categories: vec!["x".into(), "y".into()],
            groups: vec![
                BarGroup {
                    name: "g1".into(),
                    values: vec![0.25, 1.0],
                },
                BarGroup {
                    name: "g2".into(),
                    values: vec![0.5, f64::NAN],
                },
            ],
            value_labels: Some(2),
            ..Default::default()
        };
        let svg = bars.to_svg().unwrap();
        // plotters-svg puts text content on its own line.
        assert!(svg.contains("\nx\n") && svg.contains("\ny\n") && svg.contains("0.25"));
        let bad = BarChart {
            categories: vec!["x".into()],
            groups: vec![BarGroup::default()],
            ..Default::default()
        };
        assert!(matches!(bad.to_svg(), Err(PlotError::Invalid { .. })));
        let empty = Histogram {
            title: "empty".into(),
            bins: 10,
            ..Default::default()
        };
        assert!(empty.to_svg().unwrap().starts_with("<svg"));
    }
}
