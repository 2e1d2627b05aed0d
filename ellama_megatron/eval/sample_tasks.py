"""A small synthetic data set for the e-commerce lm-eval tasks, in every task language.

It exists so that tests (and a user trying the suite) can run the tasks end to end; it measures
nothing about a model. Real evaluation data comes from the user in the same format
(docs/evaluation.md).

  python -m ellama_megatron.eval.sample_tasks --out ecom_eval_data [--per-task 12]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

LANGUAGES = ("en", "de", "fr", "es", "it")
TASK_TYPES = ("category", "aspect", "sentiment", "relevance")

# (item noun per language, category path per language)
ITEMS = [
    (
        {
            "en": "running shoes",
            "de": "Laufschuhe",
            "fr": "chaussures de course",
            "es": "zapatillas de correr",
            "it": "scarpe da corsa",
        },
        {
            "en": "Clothing > Shoes",
            "de": "Kleidung > Schuhe",
            "fr": "Vêtements > Chaussures",
            "es": "Ropa > Calzado",
            "it": "Abbigliamento > Scarpe",
        },
    ),
    (
        {
            "en": "smartphone case",
            "de": "Handyhülle",
            "fr": "coque de smartphone",
            "es": "funda de móvil",
            "it": "cover per smartphone",
        },
        {
            "en": "Electronics > Phone Accessories",
            "de": "Elektronik > Handyzubehör",
            "fr": "Électronique > Accessoires téléphone",
            "es": "Electrónica > Accesorios de móvil",
            "it": "Elettronica > Accessori telefono",
        },
    ),
    (
        {"en": "coffee maker", "de": "Kaffeemaschine", "fr": "cafetière", "es": "cafetera", "it": "macchina da caffè"},
        {
            "en": "Home > Kitchen Appliances",
            "de": "Haushalt > Küchengeräte",
            "fr": "Maison > Électroménager",
            "es": "Hogar > Electrodomésticos",
            "it": "Casa > Elettrodomestici",
        },
    ),
    (
        {"en": "wristwatch", "de": "Armbanduhr", "fr": "montre", "es": "reloj de pulsera", "it": "orologio da polso"},
        {
            "en": "Jewelry > Watches",
            "de": "Schmuck > Uhren",
            "fr": "Bijoux > Montres",
            "es": "Joyería > Relojes",
            "it": "Gioielli > Orologi",
        },
    ),
    (
        {
            "en": "car battery",
            "de": "Autobatterie",
            "fr": "batterie de voiture",
            "es": "batería de coche",
            "it": "batteria auto",
        },
        {
            "en": "Vehicle Parts > Batteries",
            "de": "Autoteile > Batterien",
            "fr": "Pièces auto > Batteries",
            "es": "Recambios > Baterías",
            "it": "Ricambi auto > Batterie",
        },
    ),
]
BRANDS = ["Acme", "Nordlicht", "Solara", "Vento", "Kirin", "Orbis"]
COLORS = {
    "en": ["black", "white", "red", "blue", "green"],
    "de": ["schwarz", "weiß", "rot", "blau", "grün"],
    "fr": ["noir", "blanc", "rouge", "bleu", "vert"],
    "es": ["negro", "blanco", "rojo", "azul", "verde"],
    "it": ["nero", "bianco", "rosso", "blu", "verde"],
}
WORDS = {  # aspect names, sentiment labels and yes/no in each language
    "en": {
        "Color": "Color",
        "Brand": "Brand",
        "neg": "negative",
        "pos": "positive",
        "no": "no",
        "yes": "yes",
        "good": "Great {item}, works perfectly, fast shipping.",
        "bad": "The {item} broke after two days, very disappointed.",
    },
    "de": {
        "Color": "Farbe",
        "Brand": "Marke",
        "neg": "negativ",
        "pos": "positiv",
        "no": "nein",
        "yes": "ja",
        "good": "Tolle {item}, funktioniert perfekt, schneller Versand.",
        "bad": "Die {item} ging nach zwei Tagen kaputt, sehr enttäuscht.",
    },
    "fr": {
        "Color": "Couleur",
        "Brand": "Marque",
        "neg": "négatif",
        "pos": "positif",
        "no": "non",
        "yes": "oui",
        "good": "Super {item}, fonctionne parfaitement, livraison rapide.",
        "bad": "Le produit {item} a cassé après deux jours, très déçu.",
    },
    "es": {
        "Color": "Color",
        "Brand": "Marca",
        "neg": "negativo",
        "pos": "positivo",
        "no": "no",
        "yes": "sí",
        "good": "Excelente {item}, funciona perfectamente, envío rápido.",
        "bad": "El producto {item} se rompió a los dos días, muy decepcionado.",
    },
    "it": {
        "Color": "Colore",
        "Brand": "Marca",
        "neg": "negativo",
        "pos": "positivo",
        "no": "no",
        "yes": "sì",
        "good": "Ottimo {item}, funziona perfettamente, spedizione veloce.",
        "bad": "Il prodotto {item} si è rotto dopo due giorni, molto deluso.",
    },
}


def _record(task: str, lang: str, i: int, rng: random.Random) -> dict:
    item, cat = ITEMS[rng.randrange(len(ITEMS))]
    brand, color = rng.choice(BRANDS), rng.choice(COLORS[lang])
    title = f"{brand} {item[lang]} {color}"
    w = WORDS[lang]
    rec: dict = {"id": f"{task}_{lang}_{i}", "language": lang}
    if task == "category":
        choices = [c[lang] for _, c in ITEMS]
        rec.update(title=title, choices=choices, label=choices.index(cat[lang]))
    elif task == "aspect":
        if rng.random() < 0.5:
            choices = COLORS[lang][:4] if color in COLORS[lang][:4] else COLORS[lang][:3] + [color]
            rec.update(title=title, aspect=w["Color"], choices=choices, label=choices.index(color))
        else:
            choices = BRANDS[:4] if brand in BRANDS[:4] else BRANDS[:3] + [brand]
            rec.update(title=title, aspect=w["Brand"], choices=choices, label=choices.index(brand))
    elif task == "sentiment":
        good = rng.random() < 0.5
        rec.update(
            review=w["good" if good else "bad"].format(item=item[lang]), choices=[w["neg"], w["pos"]], label=int(good)
        )
    elif task == "relevance":
        q_item, _ = ITEMS[rng.randrange(len(ITEMS))]
        rec.update(query=f"{q_item[lang]} {color}", title=title, choices=[w["no"], w["yes"]], label=int(q_item is item))
    else:
        raise ValueError(f"unknown task type {task!r}")
    return rec


def write_sample_task_data(out_dir: str | Path, per_task: int = 12, seed: int = 0) -> list[Path]:
    """Write ``<type>_<lang>.jsonl`` for every task type and language; returns the files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = []
    for task in TASK_TYPES:
        for lang in LANGUAGES:
            p = out / f"{task}_{lang}.jsonl"
            with open(p, "w", encoding="utf-8") as f:
                for i in range(per_task):
                    f.write(json.dumps(_record(task, lang, i, rng), ensure_ascii=False) + "\n")
            files.append(p)
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the <type>_<lang>.jsonl files")
    p.add_argument("--per-task", type=int, default=12, help="records per task and language (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    args = p.parse_args(argv)
    files = write_sample_task_data(args.out, args.per_task, args.seed)
    print(f"wrote {len(files)} sample task files ({args.per_task} records each) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
