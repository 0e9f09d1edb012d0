"""The embedder training recipe's settings: batches, schedule, and the weight of every view and
loss term (`python -m sdk.train.train_embedder` has a flag for each)."""

from __future__ import annotations

from dataclasses import dataclass

from .prompts import DEFAULT_PROMPT_FIELDS, PROMPT_FIELDS


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256
    group_size: int = 8  # products of one article type placed together in a batch
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    temperature: float = 0.05
    image_token_drop: float = 0.3
    trace_drop: float = 0.2  # share of rows of the trace views trained without their trace
    freeze_image: bool = False  # keep the image encoder as it is (continued training; a third of the step time)
    seed: int = 0
    # distillation from a teacher embedder (sdk.export.distill): weights of the InfoNCE terms, of
    # 1 - cosine to the teacher's vector of the same view, and of the relational term (KL between
    # the teacher's and the student's in-batch similarity distributions at distill_temperature)
    contrastive_weight: float = 1.0
    distill_cosine: float = 0.0
    distill_relational: float = 0.0
    distill_temperature: float = 0.05
    # learning rate of fine-tuned pretrained tower layers (EmbedderConfig.text_tuned_layers,
    # image_tuned_blocks), as a share of lr
    tower_lr_scale: float = 0.1
    # views that keep what the towers know (they need `sdk.train.features --renditions K`):
    # the share of photo-only and description views whose photo is a cached rendition; the weight
    # of the image-image instance term (a rendition's photo-only vector against its original's);
    # the weight of the field-caption terms (caption -> photo + title, caption <-> photo); the
    # weight of the relational term that keeps the photo vectors' in-batch similarities those of
    # the frozen tower's pooled features (at tower_temperature)
    rendition_prob: float = 0.0
    image_instance: float = 0.0
    caption_weight: float = 0.0
    tower_relational: float = 0.0
    tower_temperature: float = 0.05
    # the same relational term for the title-only vectors against MiniLM's standardised pooled
    # title states, and for the photo + title vectors against both towers' (each standardised,
    # normalised, concatenated: the probe's sum of the two): what nearest-neighbour categories
    # and zero-shot prompts read
    text_relational: float = 0.0
    mm_relational: float = 0.0
    # supervised contrastive term over article types (`category_term`): photo + title and photo-only
    # vectors of one article type gather (what nearest-neighbour categories and zero-shot type
    # prompts read), at category_temperature
    category_weight: float = 0.0
    category_temperature: float = 0.1
    # the same over base colours: keeps colour in the vectors that the article-type term would
    # otherwise make colour-blind (zero-shot colour prompts)
    colour_weight: float = 0.0
    # the base-colour term on the photo-only vectors alone (what zero-shot colour prompts read),
    # leaving the photo + title vectors' neighbourhoods to the article-type term
    photo_colour_weight: float = 0.0
    # how a model with a skip path (EmbedderConfig.skip_path) starts: "zero" (the skip maps at
    # zero: the fusion's output) or "probe" (the skip maps are a linear probe trained here on the
    # training rows' pooled features, and the fusion's output projection starts at zero: training
    # starts from the probe and the fusion learns a residual on it)
    skip_init: str = "zero"
    # learning rate of the skip maps as a share of lr; 0 keeps them as they start (with
    # skip_init="probe": the probe stays as its own early-stopped training left it, and the fusion
    # learns a residual on it)
    skip_lr_scale: float = 1.0
    # field-prompt term (`prompt_term`): each photo-only vector picks its article type, base colour
    # and gender among short class prompts ("a {type} item", "{colour} coloured", "for {gender}")
    # embedded by the model's own title path, so field words and photos share directions
    prompt_weight: float = 0.0
    # the fields of `PROMPT_FIELDS` the prompt term uses, comma-separated
    prompt_fields: str = DEFAULT_PROMPT_FIELDS
    # weight of the photo-only <-> title-only term among the InfoNCE terms (cross-modal search)
    cross_modal_weight: float = 1.0
    # decay per step of an exponential moving average of the weights; when > 0 the average is what
    # each epoch's validation measures and what is saved (0: the last step's weights)
    ema_decay: float = 0.0
    # train without this master category (the validation suite's out-of-domain family)
    holdout_master_category: str | None = None
    # after training, close the modality gap (`center_modalities`): the photo-only and title-only
    # vectors' means over the training products move to the origin (a skip-path model only)
    center_modalities: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.group_size < 1:
            raise ValueError(f"bad TrainConfig sizes: {self}")
        if self.batch_size % self.group_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of group_size ({self.group_size})")
        if not 0.0 < self.temperature < 1.0:
            raise ValueError(f"temperature must be in (0, 1), got {self.temperature}")
        if not 0.0 <= self.image_token_drop < 1.0:
            raise ValueError(f"image_token_drop must be in [0, 1), got {self.image_token_drop}")
        if min(self.contrastive_weight, self.distill_cosine, self.distill_relational) < 0:
            raise ValueError(f"loss weights must be >= 0: {self}")
        if not 0.0 < self.tower_lr_scale <= 1.0:
            raise ValueError(f"tower_lr_scale must be in (0, 1], got {self.tower_lr_scale}")
        if not 0.0 < self.distill_temperature < 1.0:
            raise ValueError(f"distill_temperature must be in (0, 1), got {self.distill_temperature}")
        if not 0.0 <= self.rendition_prob <= 1.0:
            raise ValueError(f"rendition_prob must be in [0, 1], got {self.rendition_prob}")
        if min(self.image_instance, self.caption_weight, self.tower_relational, self.text_relational,
               self.mm_relational, self.category_weight, self.colour_weight, self.photo_colour_weight,
               self.cross_modal_weight, self.prompt_weight) < 0:
            raise ValueError(f"image_instance, caption_weight and the relational weights must be >= 0: {self}")
        if not 0.0 < self.tower_temperature < 1.0:
            raise ValueError(f"tower_temperature must be in (0, 1), got {self.tower_temperature}")
        if not 0.0 < self.category_temperature < 1.0:
            raise ValueError(f"category_temperature must be in (0, 1), got {self.category_temperature}")
        if self.skip_init not in ("zero", "probe"):
            raise ValueError(f"skip_init must be 'zero' or 'probe', got {self.skip_init!r}")
        if not 0.0 <= self.skip_lr_scale <= 1.0:
            raise ValueError(f"skip_lr_scale must be in [0, 1], got {self.skip_lr_scale}")
        unknown = sorted(set(self.prompt_fields.split(",")) - set(PROMPT_FIELDS))
        if unknown or not self.prompt_fields:
            raise ValueError(f"prompt_fields: {unknown or 'none given'}; the fields are {sorted(PROMPT_FIELDS)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    @property
    def uses_renditions(self) -> bool:
        return bool(self.rendition_prob or self.image_instance or self.caption_weight)
