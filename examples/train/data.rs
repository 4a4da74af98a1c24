//! The data set: loading, splitting, shuffling (a small deterministic RNG).

/// Number of input features of the data set.
pub const FEATURES: usize = 11;
/// Share of the data set held out for the test RMSE.
const TEST_FRACTION: f64 = 0.2;
/// The train/test split is fixed (independent of `--seed`), so runs with
/// different seeds are evaluated on the same wines.
const SPLIT_SEED: u64 = 0x005E_ED0F_5A1E;

/// A deterministic generator (SplitMix64): the same numbers on every rank.
pub struct Rng(u64);

impl Rng {
    /// A generator for stream `stream` of `seed`.
    pub fn new(seed: u64, stream: u64) -> Rng {
        let mut r = Rng(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next_u64();
        r
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[-1, 1)`.
    pub fn symmetric(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// A uniformly random permutation of `0..n` (Fisher-Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            p.swap(i, j);
        }
        p
    }
}

/// The data set, split and standardised (features to zero mean and unit
/// variance, target centred; statistics from the training split only).
pub struct Data {
    /// Training features, row-major, `FEATURES` per sample.
    pub train_x: Vec<f32>,
    /// Training targets (quality minus `y_mean`).
    pub train_y: Vec<f32>,
    /// Held-out features.
    pub test_x: Vec<f32>,
    /// Held-out targets (quality minus `y_mean`).
    pub test_y: Vec<f32>,
    /// Mean quality of the training split.
    pub y_mean: f32,
}

impl Data {
    /// Number of training samples.
    pub fn n_train(&self) -> usize {
        self.train_y.len()
    }
}

/// Load Wine Quality (red) from `linfa-datasets`, split it and standardise it.
pub fn load_data() -> Data {
    let ds = linfa_datasets::winequality();
    let n = ds.targets.len();
    let x: Vec<f64> = ds.records.iter().copied().collect();
    let y: Vec<f64> = ds.targets.iter().map(|&q| q as f64).collect();
    let order = Rng::new(SPLIT_SEED, 0).permutation(n);
    let n_test = (n as f64 * TEST_FRACTION).round() as usize;
    let (test_idx, train_idx) = order.split_at(n_test);

    let mut mean = [0f64; FEATURES];
    let mut var = [0f64; FEATURES];
    for &i in train_idx {
        for f in 0..FEATURES {
            mean[f] += x[i * FEATURES + f];
        }
    }
    mean.iter_mut().for_each(|m| *m /= train_idx.len() as f64);
    for &i in train_idx {
        for f in 0..FEATURES {
            var[f] += (x[i * FEATURES + f] - mean[f]).powi(2);
        }
    }
    let std: Vec<f64> = var
        .iter()
        .map(|v| (v / train_idx.len() as f64).sqrt().max(1e-12))
        .collect();
    let y_mean = train_idx.iter().map(|&i| y[i]).sum::<f64>() / train_idx.len() as f64;

    let (x, std) = (&x, &std);
    let take = |idx: &[usize]| {
        let xs = idx
            .iter()
            .flat_map(|&i| {
                (0..FEATURES).map(move |f| ((x[i * FEATURES + f] - mean[f]) / std[f]) as f32)
            })
            .collect();
        let ys = idx.iter().map(|&i| (y[i] - y_mean) as f32).collect();
        (xs, ys)
    };
    let (train_x, train_y) = take(train_idx);
    let (test_x, test_y) = take(test_idx);
    Data {
        train_x,
        train_y,
        test_x,
        test_y,
        y_mean: y_mean as f32,
    }
}
