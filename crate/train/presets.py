"""Named recipes for `crate train --preset NAME`: each is the values it changes from TrainConfig's
defaults, and a derived recipe is its parent with what differs."""

# what every GPU recipe sets: loader workers, and a checkpoint every 1000 steps
_CLUSTER = dict(workers=8, checkpoint_every=1000)

PAPER = dict(  # the published ImageNet-1K recipe (docs/architecture.md §4.2)
    model="crate_base_patch16_224",
    dataset="imagenet",
    output="runs/imagenet-paper",
    epochs=150,
    batch_size=2048,
    lr=2.4e-4,
    lr_batch=2048,
    min_lr=0.0,
    warmup_epochs=5,
    weight_decay=0.5,
    opt="lion",
    label_smoothing=0.1,
    **_CLUSTER,
)

DEIT = PAPER | dict(  # DeiT's recipe: AdamW, RandAugment, Mixup/CutMix, random erasing, EMA
    output="runs/imagenet-deit",
    epochs=300,
    batch_size=1024,
    lr=5e-4 * 1024 / 512,
    lr_batch=1024,
    min_lr=1e-5,
    weight_decay=0.05,
    opt="adamw",
    mixup=0.8,
    cutmix=1.0,
    auto_augment="rand-m9-mstd0.5-inc1",
    reprob=0.25,
    ema_decay=0.99996,
    drop_path=0.1,
)

# CRATE-α (docs/crate-alpha.md §6): the release's JAX configs (UCSC-VLAA/CRATE-alpha,
# configs/crate/classification/{fine_tuning_in1k,pre_training_in21k}.py), at batch 4096 with the lr
# given at batch 256. Not reproduced here, in both stages:
# - the release keeps Adam's first moment in bf16 (optax scale_by_adam(mu_dtype=bfloat16)); here it
#   is float32;
# - it decays only the kernels of Dense/Conv layers (names ending "/kernel": qkv, W_out, patch
#   embedding, head), not the dictionaries D, D₁; timm's rule here decays every parameter of two or
#   more dimensions but pos_embed and cls_token, so D and D₁ too;
# - its warm-up rises linearly from 0, timm's from lr·1e-3; its eval resize is "area" (here bilinear);
# - its RandAugment is its own TF port of timm's (15 ops, no Cutout; apply probability 0.5,
#   magnitude N(9, 0.5²), increasing ops); here timm's own "rand-m9-n2-mstd0.5-inc1", whose op set
#   differs slightly; its label smoothing puts 0.9 (not 0.9 + 0.1/1000) on the true class.
ALPHA_FINETUNE = dict(  # ImageNet-1K fine-tuning of the ImageNet-21K pre-trained CRATE-α-B/16
    model="crate_alpha_base_patch16_224",
    finetune="crate_alpha_base_patch16_224.in21k",
    # The release does not load the patch embedding's kernel (dont_load: head/*, embedding/kernel)
    # and trains it anew from its random init; here it is loaded with the rest. The head (19,167
    # classes) is dropped because the class count differs.
    dataset="imagenet",
    output="runs/imagenet-alpha-finetune",
    epochs=91,
    batch_size=4096,
    lr=1e-5,  # at batch 256: 1.6e-4 at 4096
    lr_batch=256,
    min_lr=1e-6,
    warmup_epochs=10,
    weight_decay=0.1,  # decoupled and scaled by the lr, as optax's add_decayed_weights before scale(lr)
    opt="adamw",
    opt_betas="0.9,0.95",
    grad_clip=1.0,
    label_smoothing=0.1,
    mixup=0.8,
    cutmix=1.0,  # timm's Mixup switches between the two with probability 0.5, as the release
    auto_augment="rand-m9-n2-mstd0.5-inc1",  # randaug(2, 9, increase=True, timm=True)
    reprob=0.0,
    drop_path=0.0,
    **_CLUSTER,
)

# ImageNet-21K pre-training of CRATE-α-B/16, from scratch. --data: ImageNet-21K (19,167 classes in the
# release) in the ImageFolder layout, with a val/ split holding the same class folders. The
# initialisation is the PyTorch port's (crate/models/alpha.py: position embedding and cls token
# standard normal, PyTorch's Linear defaults, D and D₁ U(±√(6/4d))), not the JAX training code's
# (models/crate.py: position embedding N(0, 0.02²), cls token N(0, 1e-6²), qkv, W_out and head
# N(0, 0.02²) with zero biases, and flax's kaiming_uniform on the (d, 4d) dictionaries, whose fan-in
# is d: U(±√(6/d)), so η‖D‖₂² ≈ 1.8 at init, not 0.45).
ALPHA_PRETRAIN = ALPHA_FINETUNE | dict(
    finetune=None,
    output="runs/imagenet21k-alpha-pretrain",
    lr=5e-5,  # at batch 256: 8e-4 at 4096
    label_smoothing=0.0,
    auto_augment=None,
)

# The official fine-tuning (Ma-Lab-Berkeley/CRATE finetune.py, docs/architecture.md §4.3 and README
# "Transfer"): an ImageNet-trained CRATE (--finetune SOURCE) on CIFAR-10 at 224² inputs. CIFAR-100:
# same; Flowers-102 and Oxford-IIIT Pets: --lr 1e-4 --epochs 400 and their dataset names. The
# official head is LayerNorm + Linear re-created; here the Linear is new and the LayerNorm (fc_norm)
# is loaded. Mixed precision is bf16 autocast (the official script: fp16 with a scaler).
TRANSFER = dict(
    model="crate_base_patch16_224",
    dataset="torch/cifar10",
    output="runs/transfer-cifar10",
    epochs=200,
    batch_size=256,
    lr=5e-5,
    lr_batch=256,
    min_lr=0.0,
    warmup_epochs=0.0,  # cosine from the first step, no warm-up
    weight_decay=0.01,  # AdamW(weight_decay=0.01), betas (0.9, 0.999)
    opt="adamw",
    label_smoothing=0.0,
    auto_augment="tv-rand-n2-m14",  # torchvision's RandAugment(2, 14) after crop and flip
    hflip=0.5,
    eval_crop_pct=1.0,  # the official test transform: Resize((224, 224)), no crop
    eval_crop_mode="squash",
    **_CLUSTER,
)

# Masked-autoencoder pre-training of CRATE-MAE (crate_mae_*, crate/models/mae.py). The CRATE release
# (Ma-Lab-Berkeley/CRATE model/crate_ae/) has the model and no training code: its README says to train
# it with the MAE repository (facebookresearch/mae main_pretrain.py), whose ImageNet-1K recipe this is
# (the MAE paper's Table 8): AdamW, betas (0.9, 0.95), weight decay 0.05, batch 4096, base lr 1.5e-4
# at batch 256 (lr = blr × batch / 256: 2.4e-3 at 4096), cosine to 0 after 40 linear warm-up epochs,
# 800 epochs, mask ratio 0.75, RandomResizedCrop(scale 0.2-1, bicubic) and a horizontal flip, no
# other augmentation, no labels. The CRATE-MAE paper names no other recipe, so it is this one.
# What differs, or is not said:
# - MAE decays every parameter of two or more dimensions, mask and cls tokens included; here timm's
#   rule also spares the model's no_weight_decay() (cls_token, mask_token); biases and norms as MAE;
# - MAE's warm-up rises from 0 by iteration, timm's from lr·1e-3 by step; both cosine by step;
# - norm_pix_loss: MAE's paper recipe uses it, the CRATE-MAE configuration does not say; off here
#   (the model's default: targets in normalised pixels, which the reconstruction figures show);
# - λ of the ISTA step: 5.0, the published Base weights' (crate/models/mae.py).
# On 28×28 grayscale sets (fashion-mnist, digits: in memory, no crop), the light augmentation is the
# flip alone; a 4-pixel patch is too coarse for a crop of a fifth of the image to keep the object.
MAE = dict(
    model="crate_mae_base_patch16_224",
    dataset="imagenet",
    output="runs/imagenet-mae",
    epochs=800,
    batch_size=4096,
    lr=1.5e-4,  # the "base lr" (blr) at batch 256: scaled linearly to --batch-size
    lr_batch=256,
    min_lr=0.0,
    warmup_epochs=40,
    weight_decay=0.05,
    opt="adamw",
    opt_betas="0.9,0.95",
    label_smoothing=0.0,
    mixup=0.0,
    cutmix=0.0,
    mask_ratio=0.75,
    crop_scale="0.2,1.0",
    hflip=0.5,
    random_shift=0,
    eval_every=20,  # MAE saves every 20 epochs; each evaluation (and its checkpoint) costs little
    **_CLUSTER,
)

PRESETS = {
    # TrainConfig's defaults, without horizontal flips: in the demo's 10 epochs the flips cost more
    # fitting than they add (README "What make demo shows")
    "fashion-mnist": dict(hflip=0.0),
    "paper": PAPER,
    "deit": DEIT,
    "alpha-finetune": ALPHA_FINETUNE,
    "alpha-pretrain": ALPHA_PRETRAIN,
    "transfer": TRANSFER,
    "mae": MAE,
}
