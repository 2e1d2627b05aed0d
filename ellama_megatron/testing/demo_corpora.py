"""Synthetic corpora for the demo, tests and benchmarks: e-commerce listings and reviews in
English, German and French (JSON Lines records, the shape real marketplace dumps have) and
general-domain text in English (plus a little German and French). Domains use clearly different
vocabularies, so a tiny model's per-domain losses separate. Deterministic from a seed; sized by
the number of documents.

    python -m ellama_megatron.testing.demo_corpora OUT_DIR --docs 2000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from ellama_megatron.formats.atomic import atomic_file

LANGUAGES = ("en", "de", "fr")

# Per language: category paths, aspect names, conditions, description and review phrases.
LISTING_WORDS = {
    "en": {
        "categories": [
            ["Electronics", "Cell Phones & Accessories", "Cell Phones & Smartphones"],
            ["Home & Garden", "Kitchen, Dining & Bar", "Cookware"],
            ["Clothing, Shoes & Accessories", "Men", "Men's Shoes", "Sneakers"],
            ["Collectibles", "Trading Cards", "Sealed Booster Packs"],
            ["Sporting Goods", "Cycling", "Bicycle Components & Parts"],
            ["Toys & Hobbies", "Building Toys", "Building Sets"],
        ],
        "products": [
            "smartphone",
            "frying pan",
            "running sneakers",
            "booster box",
            "disc brake set",
            "building set",
            "wireless earbuds",
            "cast iron skillet",
        ],
        "aspects": {
            "Brand": None,
            "Color": ["Black", "White", "Red", "Blue", "Silver"],
            "Size": ["S", "M", "L", "10", "11", "28 cm"],
            "Material": ["Aluminium", "Leather", "Cast Iron", "Plastic"],
            "Model": None,
        },
        "conditions": ["New", "New with box", "Used", "Seller refurbished", "For parts or not working"],
        "phrases": [
            "Brand new and sealed in the original packaging.",
            "Ships within one business day with tracking.",
            "Free returns within 30 days.",
            "Tested and fully working, minor scratches on the back.",
            "Authentic item, comes with receipt.",
            "Buy it now, best offer considered.",
            "Combined shipping available for multiple items.",
        ],
        "review_titles": ["Great value", "Exactly as described", "Fast shipping", "Disappointed", "Would buy again"],
        "review_phrases": [
            "Arrived quickly and well packed.",
            "Works perfectly, the seller was very helpful.",
            "The color is slightly different from the photos.",
            "Battery life is excellent.",
            "Stopped working after two weeks, returned it.",
            "Fits true to size.",
        ],
    },
    "de": {
        "categories": [
            ["Handys & Kommunikation", "Handys & Smartphones"],
            ["Haushaltsgeräte", "Küche", "Pfannen & Töpfe"],
            ["Kleidung & Accessoires", "Herrenschuhe", "Turnschuhe & Sneaker"],
            ["Sammeln & Seltenes", "Sammelkartenspiele", "Booster Packs"],
            ["Sport", "Radsport", "Fahrradteile"],
        ],
        "products": ["Smartphone", "Bratpfanne", "Laufschuhe", "Display-Box", "Scheibenbremse", "Kopfhörer"],
        "aspects": {
            "Marke": None,
            "Farbe": ["Schwarz", "Weiß", "Rot", "Blau", "Silber"],
            "Größe": ["42", "43", "44", "28 cm"],
            "Material": ["Aluminium", "Leder", "Gusseisen", "Kunststoff"],
            "Modell": None,
        },
        "conditions": ["Neu", "Neu mit Etikett", "Gebraucht", "Generalüberholt", "Als Ersatzteil / defekt"],
        "phrases": [
            "Neu und originalverpackt.",
            "Versand innerhalb von 24 Stunden mit Sendungsverfolgung.",
            "Privatverkauf, keine Garantie und Rücknahme.",
            "Voll funktionsfähig, leichte Gebrauchsspuren.",
            "Rechnung liegt bei.",
            "Abholung oder Versand möglich.",
        ],
        "review_titles": ["Top Preis-Leistung", "Wie beschrieben", "Schneller Versand", "Enttäuscht", "Gerne wieder"],
        "review_phrases": [
            "Schnelle Lieferung und gut verpackt.",
            "Funktioniert einwandfrei, sehr freundlicher Verkäufer.",
            "Die Farbe weicht etwas von den Fotos ab.",
            "Der Akku hält sehr lange.",
            "Nach zwei Wochen kaputt, zurückgeschickt.",
            "Passt perfekt.",
        ],
    },
    "fr": {
        "categories": [
            ["Téléphonie, mobilité", "Téléphones mobiles"],
            ["Maison", "Cuisine, arts de la table", "Poêles"],
            ["Vêtements, accessoires", "Chaussures homme", "Baskets"],
            ["Collections", "Cartes à collectionner", "Boosters"],
            ["Sports, vacances", "Cyclisme", "Pièces de vélo"],
        ],
        "products": ["smartphone", "poêle", "baskets de course", "coffret de boosters", "frein à disque", "écouteurs"],
        "aspects": {
            "Marque": None,
            "Couleur": ["Noir", "Blanc", "Rouge", "Bleu", "Argent"],
            "Taille": ["40", "41", "42", "28 cm"],
            "Matière": ["Aluminium", "Cuir", "Fonte", "Plastique"],
            "Modèle": None,
        },
        "conditions": ["Neuf", "Neuf avec étiquettes", "Occasion", "Reconditionné", "Pour pièces"],
        "phrases": [
            "Neuf, jamais utilisé, dans son emballage d'origine.",
            "Expédition sous 24 heures avec suivi.",
            "Retour accepté sous 14 jours.",
            "Fonctionne parfaitement, quelques rayures.",
            "Facture fournie.",
            "Envoi soigné en colis suivi.",
        ],
        "review_titles": [
            "Très bon rapport qualité-prix",
            "Conforme à la description",
            "Livraison rapide",
            "Déçu",
            "Je recommande",
        ],
        "review_phrases": [
            "Livraison rapide et colis bien protégé.",
            "Fonctionne parfaitement, vendeur très sérieux.",
            "La couleur est un peu différente des photos.",
            "L'autonomie de la batterie est excellente.",
            "Tombé en panne après deux semaines.",
            "Taille normalement.",
        ],
    },
}

GENERAL_WORDS = {
    "en": {
        "subjects": [
            "The river",
            "An old manuscript",
            "The committee",
            "A young astronomer",
            "The village",
            "The theory of evolution",
            "The orchestra",
            "Early settlers",
            "The glacier",
            "A medieval monastery",
        ],
        "verbs": [
            "describes",
            "shaped",
            "revealed",
            "was studied by",
            "influenced",
            "inspired",
            "challenged",
            "preserved",
            "transformed",
            "documented",
        ],
        "objects": [
            "the history of the region",
            "the migration of birds",
            "a new understanding of light",
            "the structure of the cell",
            "the poetry of the period",
            "the mountain landscape",
            "ancient trade routes",
            "the development of mathematics",
            "the climate of the northern valleys",
            "the philosophy of language",
        ],
        "tails": [
            "over several centuries.",
            "according to later historians.",
            "in the late nineteenth century.",
            "during a long and difficult winter.",
            "as scholars continue to debate.",
            "with remarkable precision.",
        ],
    },
    "de": {
        "subjects": [
            "Der Fluss",
            "Eine alte Handschrift",
            "Die Stadt",
            "Ein junger Forscher",
            "Das Orchester",
            "Die Bevölkerung",
        ],
        "verbs": ["beschreibt", "prägte", "veränderte", "beeinflusste", "bewahrte"],
        "objects": [
            "die Geschichte der Region",
            "die Entwicklung der Wissenschaft",
            "die Landschaft der Alpen",
            "die Sprache des Mittelalters",
            "das politische Leben",
        ],
        "tails": ["über mehrere Jahrhunderte.", "im neunzehnten Jahrhundert.", "nach Ansicht vieler Historiker."],
    },
    "fr": {
        "subjects": [
            "Le fleuve",
            "Un vieux manuscrit",
            "La ville",
            "Un jeune chercheur",
            "L'orchestre",
            "La population",
        ],
        "verbs": ["décrit", "a façonné", "a transformé", "a influencé", "a préservé"],
        "objects": [
            "l'histoire de la région",
            "le développement des sciences",
            "le paysage des Alpes",
            "la langue du Moyen Âge",
            "la vie politique",
        ],
        "tails": ["pendant plusieurs siècles.", "au dix-neuvième siècle.", "selon de nombreux historiens."],
    },
}

_SYLLABLES = (
    "ka lo mi ra ne so ti va ze qu or an el is um ba de fi go hu ja ko lu mo nu pe ri sa to vi xo yu zo".split()
)


def _brand(rng: random.Random) -> str:
    # A long tail of made-up brand names (real catalogues are full of rare names and model codes).
    k = len(_SYLLABLES)
    n = min(int(k**3 * rng.random() ** 3), k**3 - 1)
    a, b, c = n % k, (n // k) % k, n // (k * k)
    return (_SYLLABLES[a] + _SYLLABLES[b] + _SYLLABLES[c]).capitalize()


def _model_code(rng: random.Random) -> str:
    return f"{rng.choice('ABCDEFGHKLMNPRSTXZ')}{rng.choice('ABCDEFGHKLMNPRSTXZ')}-{rng.randint(100, 9999)}"


def make_listing(rng: random.Random, lang: str, idx: int) -> dict:
    w = LISTING_WORDS[lang]
    brand, product, model = _brand(rng), rng.choice(w["products"]), _model_code(rng)
    aspects = []
    for name, values in w["aspects"].items():
        if rng.random() < 0.8:
            value = brand if name in ("Brand", "Marke", "Marque") else model if values is None else rng.choice(values)
            aspects.append({"name": name, "value": value})
    items = "".join(f"<li>{rng.choice(w['phrases'])}</li>" for _ in range(rng.randint(1, 4)))
    description = (
        f"<p><b>{brand} {product} {model}</b></p><p>{' '.join(rng.sample(w['phrases'], 2))}</p><ul>{items}</ul>"
    )
    record = {
        "id": f"listing-{lang}-{idx}",
        "title": f"{brand} {product} {model} {rng.choice(w['aspects'][list(w['aspects'])[1]])}",
        "category_path": rng.choice(w["categories"]),
        "aspects": aspects,
        "condition": rng.choice(w["conditions"]),
        "description": description,
        "price": round(rng.uniform(2, 900), 2),
        "language": lang,
    }
    if rng.random() < 0.1:
        del record["condition"]  # real listings miss optional fields
    return record


def make_review(rng: random.Random, lang: str, idx: int) -> dict:
    w = LISTING_WORDS[lang]
    return {
        "id": f"review-{lang}-{idx}",
        "product": f"{_brand(rng)} {rng.choice(w['products'])} {_model_code(rng)}",
        "rating": rng.randint(1, 5),
        "title": rng.choice(w["review_titles"]),
        "text": " ".join(rng.choice(w["review_phrases"]) for _ in range(rng.randint(1, 5))),
        "language": lang,
    }


def make_general(rng: random.Random, lang: str, idx: int) -> dict:
    w = GENERAL_WORDS[lang]
    sentences = [
        f"{rng.choice(w['subjects'])} {rng.choice(w['verbs'])} {rng.choice(w['objects'])} {rng.choice(w['tails'])}"
        for _ in range(rng.randint(3, 12))
    ]
    return {"id": f"general-{lang}-{idx}", "text": " ".join(sentences), "language": lang}


def write_jsonl(path: Path, records) -> Path:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def write_demo_corpora(out_dir: str | Path, docs: int = 1000, seed: int = 0, general: bool = True) -> dict[str, Path]:
    """Write listings.jsonl, reviews.jsonl (en/de/fr mixed), general_en.jsonl and
    general_multilingual.jsonl (de/fr, a tenth of ``docs``) into ``out_dir``; returns their paths.
    ``general=False``: the e-commerce corpora only (the real-model demo's general text is real prose)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def corpus(maker, name, n, langs, salt):
        rng = random.Random(f"{seed}/{salt}")
        return write_jsonl(out / name, (maker(rng, langs[i % len(langs)], i) for i in range(n)))

    paths = {
        "listings": corpus(make_listing, "listings.jsonl", docs, LANGUAGES, "listings"),
        "reviews": corpus(make_review, "reviews.jsonl", docs, LANGUAGES, "reviews"),
    }
    if general:
        paths["general_en"] = corpus(make_general, "general_en.jsonl", docs, ("en",), "general_en")
        paths["general_multilingual"] = corpus(
            make_general, "general_multilingual.jsonl", max(1, docs // 10), ("de", "fr"), "general_ml"
        )
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write the synthetic demo corpora (JSON Lines).")
    p.add_argument("out_dir", help="folder to write into")
    p.add_argument("--docs", type=int, default=1000, help="documents per corpus (general_multilingual gets a tenth)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same files")
    args = p.parse_args(argv)
    paths = write_demo_corpora(args.out_dir, args.docs, args.seed)
    print("wrote " + ", ".join(f"{k}: {v.stat().st_size:,} bytes" for k, v in paths.items()))


if __name__ == "__main__":
    main()
