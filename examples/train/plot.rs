//! Plotting the loss curves (SVG).

use super::*;

/// Draw training MSE and held-out RMSE per epoch into an SVG file.
pub fn plot_losses(path: &Path, log: &[EpochStats], ranks: usize) -> Result<(), TrainError> {
    use plotters::prelude::*;
    let fail =
        |e: &dyn std::fmt::Display| TrainError::Usage(format!("--plot {}: {e}", path.display()));
    let (Some(first), Some(last)) = (log.first(), log.last()) else {
        return Ok(());
    };
    let top = log
        .iter()
        .flat_map(|s| [s.train_mse, s.test_rmse])
        .fold(0.0f64, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let x0 = first.epoch as f64 - 0.5;
    let x1 = last.epoch as f64 + 0.5;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Wine Quality MLP, data-parallel on {ranks} rank(s)"),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, 0.0..top.max(1e-6))
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("loss")
        .draw()
        .map_err(|e| fail(&e))?;
    type Series = (&'static str, RGBColor, fn(&EpochStats) -> f64);
    let series: [Series; 2] = [
        ("training MSE", BLUE, |s| s.train_mse),
        ("held-out RMSE", RED, |s| s.test_rmse),
    ];
    for (name, color, f) in series {
        chart
            .draw_series(LineSeries::new(
                log.iter().map(|s| (s.epoch as f64, f(s))),
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
    root.present().map_err(|e| fail(&e))
}
