"""Encode real data the SD3 way: images through a VAE, captions through CLIP(s) and T5, from local folders.

SD3 (section 5.1 and its reference code) conditions on
- ``text_tokens``: the CLIP encoders' penultimate hidden states concatenated along channels, zero-padded to
  T5's width, followed along the sequence by T5's last hidden states: (77 + T5 tokens, 4096);
- ``text_pooled``: the CLIP encoders' projected pooled outputs concatenated: (2048,);
- ``latent``: the VAE posterior mean, shifted and scaled by the VAE config's ``shift_factor`` and
  ``scaling_factor`` (so latents are roughly unit variance).
Models are read from the user's local folders (diffusers ``AutoencoderKL``, transformers CLIP/T5 and
tokenizers); nothing is downloaded. The folders are recorded in the manifest so ``load_text_encoder``
rebuilds the same text encoder for prompts at sampling time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class SD3Encoder:
    name = "sd3"

    def __init__(self, *, vae=None, clips=(), t5=None, clip_paths=(), t5_path: str = "", t5_tokens: int = 77,
                 clip_tokens: int = 77, device: str = "cpu", vae_path: str = ""):
        if not clips and t5 is None:
            raise ValueError("an SD3 encoder needs at least one CLIP or a T5 text encoder")
        self.vae = vae
        self.vae_path = vae_path
        self.clips = list(clips)  # [(tokenizer, CLIPTextModelWithProjection)]
        self.t5 = t5  # (tokenizer, T5EncoderModel) or None
        self.clip_paths = list(clip_paths)
        self.t5_path = t5_path
        self.t5_tokens = t5_tokens
        self.clip_tokens = clip_tokens
        self.device = device

    @classmethod
    def from_local(cls, *, vae: str = "", clip: list[str] = (), t5: str = "", t5_tokens: int = 77,
                   clip_tokens: int = 77, device: str = "cpu") -> "SD3Encoder":
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        def frozen(model):
            return model.eval().requires_grad_(False).to(device)

        vae_model = None
        if vae:
            from diffusers import AutoencoderKL

            vae_model = frozen(AutoencoderKL.from_pretrained(vae, local_files_only=True))
        clips = [(AutoTokenizer.from_pretrained(p, local_files_only=True),
                  frozen(CLIPTextModelWithProjection.from_pretrained(p, local_files_only=True))) for p in clip]
        t5_pair = ((AutoTokenizer.from_pretrained(t5, local_files_only=True),
                    frozen(T5EncoderModel.from_pretrained(t5, local_files_only=True))) if t5 else None)
        return cls(vae=vae_model, clips=clips, t5=t5_pair, clip_paths=[str(p) for p in clip], t5_path=str(t5),
                   t5_tokens=t5_tokens, clip_tokens=clip_tokens, device=device, vae_path=str(vae))

    def describe(self) -> dict:
        return {"name": self.name, "settings": {"clip": self.clip_paths, "t5": self.t5_path,
                                                 "t5_tokens": self.t5_tokens, "clip_tokens": self.clip_tokens}}

    def vae_record(self) -> dict:
        """What a decoder needs to turn the dataset's latents back into images (``LatentDecoder``)."""
        cfg = self.vae.config
        return {"path": self.vae_path, "scaling_factor": float(cfg.scaling_factor),
                "shift_factor": float(getattr(cfg, "shift_factor", None) or 0.0),
                "dtype": str(next(self.vae.parameters()).dtype).removeprefix("torch.")}

    def _ids(self, tokenizer, captions: list[str], length: int) -> torch.Tensor:
        out = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return out.input_ids.to(self.device)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (tokens (N, L, C), pooled (N, P)), float32."""
        hidden, pooled = [], []
        for tokenizer, model in self.clips:
            out = model(self._ids(tokenizer, captions, self.clip_tokens), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # penultimate layer, as in SD3
            pooled.append(out.text_embeds)
        parts = []
        width = self.t5[1].config.d_model if self.t5 else sum(h.shape[-1] for h in hidden)
        if hidden:
            clip = torch.cat(hidden, dim=-1)
            parts.append(torch.nn.functional.pad(clip, (0, width - clip.shape[-1])))
        if self.t5:
            tokenizer, model = self.t5
            parts.append(model(self._ids(tokenizer, captions, self.t5_tokens)).last_hidden_state)
        pooled_all = torch.cat(pooled, dim=-1) if pooled else torch.zeros(len(captions), 0, device=self.device)
        return torch.cat(parts, dim=1).float().cpu(), pooled_all.float().cpu()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> latents (N, C, H/f, W/f), float32."""
        if self.vae is None:
            raise ValueError("this encoder was built without a VAE (pass --vae)")
        cfg = self.vae.config
        mean = self.vae.encode(images.to(self.device)).latent_dist.mean
        return ((mean - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor).float().cpu()


class LatentDecoder:
    """Latents of a dataset encoded by ``write_image_folder`` back to RGB images in [0, 1], through the VAE
    its manifest records (``extra.vae``: the local folder, the scaling and shift, the precision it ran in).
    The VAE is loaded on first use, once per decoder."""

    def __init__(self, record: dict, device: str | torch.device = "cpu"):
        self.record, self.device, self._vae = record, torch.device(device), None

    def _load(self):
        from diffusers import AutoencoderKL

        path = self.record["path"]
        if not Path(path).is_dir():
            raise FileNotFoundError(f"the dataset's VAE folder {path} (manifest extra.vae.path) is not on this machine")
        dtype = getattr(torch, self.record.get("dtype", "float32"))
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        return vae.eval().requires_grad_(False).to(self.device)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) latents -> (N, 3, H, W) float32 images in [0, 1], on the CPU."""
        if self._vae is None:
            self._vae = self._load()
        dtype = next(self._vae.parameters()).dtype
        z = latents.to(self.device, dtype) / self.record["scaling_factor"] + self.record.get("shift_factor", 0.0)
        return ((self._vae.decode(z).sample.float().cpu() + 1) / 2).clamp(0, 1)


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """An image file as (3, R, R) in [-1, 1]: shorter side resized to R, then center-cropped."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = resolution / min(im.size)
        im = im.resize((max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))),
                       Image.BICUBIC)
        left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def write_image_folder(images: str, out: str, encoder: SD3Encoder, *, resolution: int = 256, batch: int = 16,
                       shard_rows: int = 64, storage_options: dict | None = None) -> str:
    """Encode every image of a folder with its same-named ``.txt`` caption; latents and text stored bf16."""
    from dataloaders.writer import DatasetWriter

    files = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images}")
    missing = [p.name for p in files if not p.with_suffix(".txt").exists()]
    if missing:
        raise FileNotFoundError(f"images without a caption file (<name>.txt) in {images}: {missing[:5]}")
    empty_tokens, empty_pooled = encoder.encode([""])
    with DatasetWriter(out, shard_rows=shard_rows, storage_options=storage_options, text_encoder=encoder.describe(),
                       progress=len(files), extra={"source": str(images), "resolution": resolution,
                                                   "vae": encoder.vae_record()}) as w:
        w.set_empty_condition(empty_tokens[0].to(torch.bfloat16), empty_pooled[0].to(torch.bfloat16))
        for first in range(0, len(files), batch):
            chunk = files[first:first + batch]
            captions = [p.with_suffix(".txt").read_text().strip() for p in chunk]
            tokens, pooled = encoder.encode(captions)
            latents = encoder.encode_images(torch.stack([load_image(p, resolution) for p in chunk]))
            w.write({
                "sample_id": np.arange(first, first + len(chunk), dtype=np.int64),
                "latent": latents.to(torch.bfloat16),
                "text_tokens": tokens.to(torch.bfloat16),
                "text_pooled": pooled.to(torch.bfloat16),
                "caption": captions,
                "file": [p.name for p in chunk],
            })
    return w.url
