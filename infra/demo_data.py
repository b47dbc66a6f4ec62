"""Generated demo corpus: multilingual text with planted duplicates, PII and junk,
speech/tone audio, procedural images and short videos with shot cuts — all made
locally, nothing downloaded. Every generator is seeded, so a demo run is repeatable.
"""

from __future__ import annotations

import base64
import io
import random
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from streams.events import RawRecord

__all__ = ["DemoCorpus", "audio_records", "image_records", "junk_payloads", "text_records", "video_records"]

_TEMPLATES = {
    "en": [
        "The {a} {n} near the {p} was rebuilt after the {t} floods.",
        "Local historians describe how merchants once traded {g} along its banks.",
        "Today visitors can walk from the {n2} to the old {n} in about twenty minutes.",
        "A committee of {k} volunteers raised money for new lamps and benches.",
        "Critics argued that the plan ignored the needs of families living nearby.",
        "According to the council, repairs will cost roughly {x} thousand pounds.",
        "Several schools organise guided tours every spring for their pupils.",
        "The museum keeps maps, letters and photographs donated by former residents.",
        "Weather permitting, the annual festival opens on the first Saturday of {m}.",
        "Engineers measured the foundations and found them surprisingly stable.",
    ],
    "de": [
        "Die {a} Brücke am Rand der Stadt wurde nach dem Hochwasser neu gebaut.",
        "Historiker berichten, dass Händler dort früher mit {g} gehandelt haben.",
        "Heute braucht man vom Bahnhof bis zum alten Markt etwa zwanzig Minuten zu Fuß.",
        "Ein Verein mit {k} Mitgliedern sammelte Spenden für neue Laternen.",
        "Kritiker meinten, der Plan berücksichtige die Familien in der Nachbarschaft nicht.",
        "Nach Angaben der Gemeinde kosten die Arbeiten ungefähr {x} tausend Euro.",
        "Mehrere Schulen bieten jedes Frühjahr Führungen für ihre Klassen an.",
        "Das Museum bewahrt Karten, Briefe und Fotografien ehemaliger Bewohner auf.",
        "Bei gutem Wetter beginnt das Stadtfest am ersten Samstag im {m}.",
        "Die Ingenieure untersuchten das Fundament und waren überrascht, wie stabil es ist.",
    ],
    "fr": [
        "Le {a} pont situé près du port a été reconstruit après les inondations.",
        "Les historiens racontent que les marchands y vendaient autrefois du {g}.",
        "Aujourd'hui, il faut environ vingt minutes à pied depuis la gare jusqu'au vieux marché.",
        "Une association de {k} bénévoles a réuni des fonds pour installer des bancs.",
        "Certains habitants estiment que le projet oublie les familles du quartier.",
        "Selon la mairie, les travaux coûteront environ {x} mille euros.",
        "Plusieurs écoles organisent chaque printemps des visites guidées pour les élèves.",
        "Le musée conserve des cartes, des lettres et des photographies d'anciens habitants.",
        "Si le temps le permet, la fête commence le premier samedi de {m}.",
        "Les ingénieurs ont examiné les fondations et les ont trouvées très solides.",
    ],
    "es": [
        "El {a} puente junto al puerto fue reconstruido después de las inundaciones.",
        "Los historiadores cuentan que los comerciantes vendían allí {g} hace siglos.",
        "Hoy se tarda unos veinte minutos a pie desde la estación hasta el mercado viejo.",
        "Una asociación de {k} voluntarios reunió dinero para poner nuevas farolas.",
        "Algunos vecinos opinan que el proyecto olvida a las familias del barrio.",
        "Según el ayuntamiento, las obras costarán alrededor de {x} mil euros.",
        "Varias escuelas organizan cada primavera visitas guiadas para sus alumnos.",
        "El museo guarda mapas, cartas y fotografías donadas por antiguos habitantes.",
        "Si el tiempo lo permite, la fiesta empieza el primer sábado de {m}.",
        "Los ingenieros revisaron los cimientos y los encontraron muy estables.",
    ],
}
_SLOTS = {
    "en": {"a": ["old", "narrow", "stone", "famous", "wooden"], "n": ["bridge", "mill", "market", "chapel"],
           "n2": ["station", "harbour", "library", "park"], "p": ["river", "harbour", "canal"],
           "t": ["spring", "autumn", "winter"], "g": ["wool", "salt", "grain", "timber"], "m": ["June", "July", "August"]},
    "de": {"a": ["alte", "schmale", "steinerne", "bekannte"], "g": ["Salz", "Wolle", "Getreide", "Holz"],
           "m": ["Juni", "Juli", "August"]},
    "fr": {"a": ["vieux", "petit", "célèbre", "grand"], "g": ["sel", "blé", "vin", "bois"], "m": ["juin", "juillet", "août"]},
    "es": {"a": ["viejo", "pequeño", "famoso", "gran"], "g": ["sal", "trigo", "vino", "madera"], "m": ["junio", "julio", "agosto"]},
}
SOURCES = ("wiki", "news", "forum")


def _paragraph(rng: random.Random, lang: str, sentences: int) -> str:
    """Distinct templated sentences in ``lang`` (no template twice, so no repeated n-grams)."""
    slots = {**_SLOTS[lang], "k": [str(rng.randint(12, 400))], "x": [str(rng.randint(20, 900))]}
    picked = rng.sample(_TEMPLATES[lang], min(sentences, len(_TEMPLATES[lang])))
    return " ".join(t.format(**{k: rng.choice(v) for k, v in slots.items()}) for t in picked)


def _text_record(rid: str, text: str, source: str) -> RawRecord:
    return RawRecord(id=rid, modality="text", source=source, license="cc-by-4.0", text=text)


def text_records(n: int, *, seed: int = 0, dup_rate: float = 0.1, pii_rate: float = 0.1) -> list[RawRecord]:
    """``n`` documents in en/de/fr/es; ``dup_rate`` of them exact or near copies; ``pii_rate`` carry PII."""
    rng = random.Random(seed)
    out: list[RawRecord] = []
    for i in range(n):
        if out and rng.random() < dup_rate:
            orig = rng.choice(out)
            text = orig.text if rng.random() < 0.5 else orig.text.replace(".", ";", 1)  # exact or near copy
            out.append(_text_record(f"doc-{seed}-{i}", text, orig.source))
            continue
        lang = rng.choice(list(_TEMPLATES))
        text = _paragraph(rng, lang, rng.randint(7, 10))
        if rng.random() < pii_rate:
            text += f" Contact: {rng.choice(['ana', 'li', 'tom'])}.{i}@example.org or +1 415 555 {1000 + i % 9000}."
        out.append(_text_record(f"doc-{seed}-{i}", text, rng.choice(SOURCES)))
    return out


def junk_payloads(seed: int = 0) -> list[bytes]:
    """Raw bytes a producer might send by mistake: each must end in the DLQ or a drop counter."""
    return [
        b"{not json",
        b'{"id": 5, "modality": "text", "source": "s", "license": "l", "text": "x"}',
        b'{"id": "j1", "modality": "smell", "source": "s", "license": "l", "text": "x"}',
        b'{"id": "j2", "modality": "text", "source": "s", "license": "l"}',
        b"\xff\xfe\x00garbage",
        _text_record(f"junk-{seed}-short", "buy now!!! $$$ ###", "spam").to_bytes(),
    ]


def _wav(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def _speech(text: str) -> bytes | None:
    if not shutil.which("espeak-ng"):
        return None
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-w", f.name, text], check=True, capture_output=True)
        return open(f.name, "rb").read()


def audio_records(n: int, *, seed: int = 0, seconds: float = 1.5) -> list[RawRecord]:
    """Alternating espeak-ng speech (when installed) and harmonic tones with noise, as WAV."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        data = _speech(f"Sample number {i}. The river bridge reopened last winter.") if i % 2 == 0 else None
        if data is None:
            rate = 16000
            t = np.arange(int(seconds * rate)) / rate
            f0 = rng.uniform(110, 440)
            sig = 0.4 * np.sin(2 * np.pi * f0 * t) + 0.2 * np.sin(4 * np.pi * f0 * t) + 0.02 * rng.standard_normal(t.size)
            data = _wav(sig * np.minimum(1, t * 8), rate)
        out.append(RawRecord(id=f"aud-{seed}-{i}", modality="audio", source="radio", license="cc0",
                             data_b64=base64.b64encode(data).decode()))
    return out


def _image(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    kind = rng.integers(3)
    c = rng.uniform(0, 1, 3)
    if kind == 0:
        img = np.stack([x * c[0], y * c[1], (1 - x) * c[2]], -1)
    elif kind == 1:
        k = rng.integers(2, 8)
        img = (((x * k).astype(int) + (y * k).astype(int)) % 2)[..., None] * c
    else:
        cx, cy, r = rng.uniform(0.2, 0.8, 3) * [1, 1, 0.5]
        img = (((x - cx) ** 2 + (y - cy) ** 2) < r**2)[..., None] * c + (1 - c) * 0.3
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def image_records(n: int, *, seed: int = 0, dup_rate: float = 0.15) -> list[RawRecord]:
    """Procedural PNG/JPEG images; ``dup_rate`` of them are re-encoded copies (near duplicates)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arrays: list[np.ndarray] = []
    out = []
    for i in range(n):
        if arrays and rng.random() < dup_rate:
            arr, fmt = arrays[rng.integers(len(arrays))], "JPEG"
        else:
            arr, fmt = _image(rng), "PNG"
            arrays.append(arr)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append(RawRecord(id=f"img-{seed}-{i}", modality="image", source="gallery", license="cc0",
                             data_b64=base64.b64encode(buf.getvalue()).decode(), meta={"caption": f"pattern {i}"}))
    return out


def video_bytes(shots: list[np.ndarray], *, fps: int = 8, frames_per_shot: int = 8) -> bytes:
    """An MP4 (mpeg4) of the given shots, each held with slight motion: known cuts between shots."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        h, w = shots[0].shape[:2]
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for shot in shots:
            for k in range(frames_per_shot):
                frame = av.VideoFrame.from_ndarray(np.roll(shot, k, axis=1), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def video_records(n: int, *, seed: int = 0, shots: int = 3) -> list[RawRecord]:
    """Short videos with ``shots`` distinct procedural shots each (cuts at known frames)."""
    rng = np.random.default_rng(seed)
    return [
        RawRecord(id=f"vid-{seed}-{i}", modality="video", source="clips", license="cc0",
                  data_b64=base64.b64encode(video_bytes([_image(rng) for _ in range(shots)])).decode())
        for i in range(n)
    ]


@dataclass(kw_only=True, slots=True)
class DemoCorpus:
    """How much of each modality the demo produces."""

    texts: int = 400
    audios: int = 6
    images: int = 24
    videos: int = 3
    seed: int = 0

    def records(self) -> Iterator[RawRecord]:
        """All records, modalities interleaved as a real firehose would be."""
        groups = [text_records(self.texts, seed=self.seed), audio_records(self.audios, seed=self.seed),
                  image_records(self.images, seed=self.seed), video_records(self.videos, seed=self.seed)]
        rng = random.Random(self.seed)
        pools = [list(g) for g in groups if g]
        while pools:
            pool = rng.choices(pools, weights=[len(p) for p in pools])[0]
            yield pool.pop(0)
            pools = [p for p in pools if p]
