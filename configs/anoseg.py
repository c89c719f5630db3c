"""AnoSeg (paper 003) on one MVTec AD category, at the paper's size: 256x256, batch 16.

Stage 1 trains the segmentation GAN, stage 2 the anomaly detector on its
frozen maps (twostage_jax/methods/anoseg/method.py). The paper gives no training
lengths, learning rates, loss weights or augmentation ranges: every such
value below says where it comes from.

  python main.py --config=configs/anoseg.py --workdir=runs/anoseg_bottle \
      --config.data_dir=/data/mvtec_ad --config.category=bottle
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config(num_stages=2)
  config.method = 'anoseg'
  config.stage = 'both'  # '1': AnoSeg alone (the map and its score rule), '2': the detector
  config.image_size = 256  # the paper's
  # Pseudo-anomalies are pasted from the image itself: no anomaly sources.

  # Hard augmentation + CutPaste (twostage_jax/synthesis/cutpaste.py, which
  # documents each field). The paper: each augmentation with probability 0.5.
  config.cutpaste = ml_collections.ConfigDict()
  # x_Seg = {x_Nor, x_Ano} (Eq. 1): half the samples normal, half anomalous.
  config.cutpaste.p_anomaly = 0.5
  config.cutpaste.p_rotation = 0.5
  config.cutpaste.p_perm = 0.5
  config.cutpaste.p_color_jitter = 0.5
  # CSI (Tack et al. 2020), which AnoSeg cites for hard augmentation: rotation
  # by 90/180/270 degrees and a permutation of 2x2 pieces.
  config.cutpaste.perm_grid = 2
  # SimCLR's and CSI's colour jitter strengths.
  config.cutpaste.jitter_brightness = 0.4
  config.cutpaste.jitter_contrast = 0.4
  config.cutpaste.jitter_saturation = 0.4
  config.cutpaste.jitter_hue = 0.1
  # CutPaste (Li et al. 2021) and its code: patch area 2-15% of the image,
  # aspect ratio log-uniform in [0.3, 1/0.3].
  config.cutpaste.area_min = 0.02
  config.cutpaste.area_max = 0.15
  config.cutpaste.aspect_min = 0.3

  # Networks of Table 6 (twostage_jax/methods/anoseg/model.py).
  config.model.encoder_widths = (64, 128, 256, 512)  # ResNet-18, from scratch
  config.model.decoder_widths = (512, 256, 128, 128, 128, 128)
  # One per halving of the image down to 2x2: log2(image_size) - 1 entries.
  config.model.discriminator_widths = (64, 128, 256, 512, 512, 512, 128)
  config.model.leaky_slope = 0.2  # DCGAN's
  # Concatenate x and y coordinate channels in [-1, 1] to the generators'
  # input (Sec. 3.3); off for the ablation's first three rows.
  config.model.coordinate_channels = True
  config.model.bn_momentum = 0.9  # = PyTorch momentum 0.1
  config.model.bn_epsilon = 1e-5

  # Stage 1. The paper gives no weights. L_Seg is the mean squared error (the
  # paper's introduction names MSE as the segmentation loss it uses directly).
  # L_Re and L_Seg are errors of [0, 1] values and weigh 1 each; the
  # adversarial term weighs 1/100 of them, pix2pix's ratio (Isola et al.
  # 2017: lambda = 100 for its L1 term against 1 for the GAN term).
  config.loss = ml_collections.ConfigDict()
  # False: the ablation's base model (map decoder only, no discriminator,
  # no L_Re); True: adversarial learning with the masked reconstruction.
  config.loss.adversarial = True
  config.loss.segmentation_norm = 'l2'  # or 'l1'
  config.loss.segmentation_weight = 1.0
  config.loss.reconstruction_weight = 1.0
  config.loss.adversarial_weight = 0.01
  # Departures measured for issue 29 (docs/results.md), the paper's training
  # by default. image_branch_from_step > 0: the map decoder trains alone
  # (row 2 of the ablation) for that many steps before L_Re, the adversarial
  # term and the discriminator join (the paper gives no schedule).
  # image_decoder_trains_encoder False: the image decoder reads the encoder's
  # features through a stop-gradient (the paper trains one shared encoder
  # with both decoders, so this stays an option whatever it measures).
  config.loss.image_branch_from_step = 0
  config.loss.image_decoder_trains_encoder = True
  # Measurements of stage 1, off by default (each costs one more backward
  # pass per loss term): metrics.jsonl and TensorBoard get encoder_grad_<term>,
  # the norm of the gradient each weighted term sends to the shared encoder,
  # and the discriminator's accuracy on real and fake pairs.
  config.diagnostics = False

  # Stage 2, the anomaly detector (Sec. 3.4, Appendix A), the same weighting:
  # reconstruction and feature matching 1, adversarial 1/100; L_cls as much as
  # the discriminator's adversarial term (the appendix adds them unweighted).
  config.detector = ml_collections.ConfigDict()
  config.detector.adversarial_weight = 0.01
  config.detector.reconstruction_weight = 1.0
  config.detector.feature_weight = 1.0
  config.detector.classification_weight = 1.0
  config.detector.alpha = 1.0  # Eq. 5
  config.detector.beta = 0.1
  # The detector's training budget; None: train.num_steps.
  config.stage2 = ml_collections.ConfigDict()
  config.stage2.num_steps = 5000

  config.train.global_batch_size = 16  # the paper's
  config.train.num_steps = 20000
  # DCGAN's and pix2pix's Adam for both networks: lr 2e-4, b1 0.5.
  config.train.learning_rate = 2e-4
  config.train.adam_b1 = 0.5

  # Image score of the final map: 'detector' (Eq. 5, once stage 2 is trained)
  # or 'map' (eval.score_rule of AnoSeg's map); evaluation reports both.
  config.eval.image_score = 'detector'
  return config
