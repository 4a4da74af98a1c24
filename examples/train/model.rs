//! The model: a one-hidden-layer MLP, its forward and backward passes.

use super::*;

/// A two-layer MLP `FEATURES -> hidden (ReLU) -> 1` in one flat `Vec<f32>`:
/// `w1` (hidden x FEATURES, row-major), `b1` (hidden), `w2` (hidden), `b2`.
pub struct Mlp {
    /// Hidden units.
    pub hidden: usize,
}

impl Mlp {
    /// Number of parameters.
    pub fn n_params(&self) -> usize {
        self.hidden * FEATURES + 2 * self.hidden + 1
    }

    /// Random initial parameters (He-uniform for the ReLU layer).
    pub fn init(&self, rng: &mut Rng) -> Vec<f32> {
        let h = self.hidden;
        let mut p = vec![0f32; self.n_params()];
        let a1 = (6.0 / FEATURES as f32).sqrt();
        let a2 = (3.0 / h as f32).sqrt();
        p[..h * FEATURES]
            .iter_mut()
            .for_each(|w| *w = a1 * rng.symmetric());
        p[h * FEATURES + h..h * FEATURES + 2 * h]
            .iter_mut()
            .for_each(|w| *w = a2 * rng.symmetric());
        p
    }

    /// The prediction for one sample; `act` receives the hidden
    /// pre-activations.
    fn forward(&self, p: &[f32], x: &[f32], act: &mut [f32]) -> f32 {
        let h = self.hidden;
        let (w1, rest) = p.split_at(h * FEATURES);
        let (b1, rest) = rest.split_at(h);
        let (w2, b2) = rest.split_at(h);
        let mut out = b2[0];
        for j in 0..h {
            let row = &w1[j * FEATURES..(j + 1) * FEATURES];
            let z = b1[j] + row.iter().zip(x).map(|(w, v)| w * v).sum::<f32>();
            act[j] = z;
            out += w2[j] * z.max(0.0);
        }
        out
    }

    /// Where the hidden layer's parameters end and the output layer's
    /// begin in the flat vector: `[w1 | b1]` then `[w2 | b2]`.
    pub fn split(&self) -> usize {
        self.hidden * FEATURES + self.hidden
    }

    /// Backward pass, output layer: forward every sample (keeping the
    /// hidden pre-activations in `acts` and the output gradients in `ds`),
    /// add the output layer's gradient (`[w2 | b2]`) to `gout`, and return
    /// the summed squared error. Sums run in sample order, as in
    /// [`Mlp::grad_sum`], so both give the same bits.
    pub fn backward_output(
        &self,
        p: &[f32],
        xs: &[f32],
        ys: &[f32],
        acts: &mut Vec<f32>,
        ds: &mut Vec<f32>,
        gout: &mut [f32],
    ) -> f32 {
        let h = self.hidden;
        acts.resize(ys.len() * h, 0.0);
        ds.clear();
        let mut loss = 0f32;
        let (gw2, gb2) = gout.split_at_mut(h);
        for ((x, &y), act) in xs
            .chunks_exact(FEATURES)
            .zip(ys)
            .zip(acts.chunks_exact_mut(h))
        {
            let err = self.forward(p, x, act) - y;
            loss += err * err;
            let d = 2.0 * err;
            ds.push(d);
            gb2[0] += d;
            for (g, z) in gw2.iter_mut().zip(act.iter()) {
                *g += d * z.max(0.0);
            }
        }
        loss
    }

    /// Backward pass, hidden layer: add its gradient (`[w1 | b1]`) to
    /// `ghid`, from what [`Mlp::backward_output`] kept.
    pub fn backward_hidden(
        &self,
        p: &[f32],
        xs: &[f32],
        acts: &[f32],
        ds: &[f32],
        ghid: &mut [f32],
    ) {
        let h = self.hidden;
        let w2 = &p[h * FEATURES + h..h * FEATURES + 2 * h];
        let (gw1, gb1) = ghid.split_at_mut(h * FEATURES);
        for ((x, act), &d) in xs.chunks_exact(FEATURES).zip(acts.chunks_exact(h)).zip(ds) {
            for j in 0..h {
                if act[j] > 0.0 {
                    let dz = d * w2[j];
                    gb1[j] += dz;
                    for (g, v) in gw1[j * FEATURES..(j + 1) * FEATURES].iter_mut().zip(x) {
                        *g += dz * v;
                    }
                }
            }
        }
    }

    /// Add the gradient of the squared error summed over `rows` to `grad`
    /// (length `n_params`) and return the summed squared error.
    pub fn grad_sum(&self, p: &[f32], xs: &[f32], ys: &[f32], grad: &mut [f32]) -> f32 {
        let h = self.hidden;
        let mut act = vec![0f32; h];
        let mut loss = 0f32;
        let w2 = &p[h * FEATURES + h..h * FEATURES + 2 * h];
        for (x, &y) in xs.chunks_exact(FEATURES).zip(ys) {
            let err = self.forward(p, x, &mut act) - y;
            loss += err * err;
            let d = 2.0 * err;
            let (gw1, rest) = grad.split_at_mut(h * FEATURES);
            let (gb1, rest) = rest.split_at_mut(h);
            let (gw2, gb2) = rest.split_at_mut(h);
            gb2[0] += d;
            for j in 0..h {
                let z = act[j];
                gw2[j] += d * z.max(0.0);
                if z > 0.0 {
                    let dz = d * w2[j];
                    gb1[j] += dz;
                    for (g, v) in gw1[j * FEATURES..(j + 1) * FEATURES].iter_mut().zip(x) {
                        *g += dz * v;
                    }
                }
            }
        }
        loss
    }

    /// Summed squared error over `xs`/`ys`.
    pub fn sse(&self, p: &[f32], xs: &[f32], ys: &[f32]) -> f64 {
        let mut act = vec![0f32; self.hidden];
        xs.chunks_exact(FEATURES)
            .zip(ys)
            .map(|(x, &y)| ((self.forward(p, x, &mut act) - y) as f64).powi(2))
            .sum()
    }
}

/// This rank's contiguous share of the minibatch `global` (sample indices),
/// gathered into `xs` (features) and `ys` (targets).
pub fn take_shard(
    data: &Data,
    global: &[usize],
    rank: usize,
    size: usize,
    xs: &mut Vec<f32>,
    ys: &mut Vec<f32>,
) {
    let (s, e) = shard(global.len(), rank, size);
    xs.clear();
    ys.clear();
    for &i in &global[s..e] {
        xs.extend_from_slice(&data.train_x[i * FEATURES..(i + 1) * FEATURES]);
        ys.push(data.train_y[i]);
    }
}

/// `[start, end)` of this rank's contiguous share of `len` items.
pub fn shard(len: usize, rank: usize, size: usize) -> (usize, usize) {
    (len * rank / size, len * (rank + 1) / size)
}
