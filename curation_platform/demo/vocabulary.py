"""Words shared by the renderers and the caption templates, in every caption language.

An attribute value (``"red"``, ``"top left"``) is the single key for both its pixels and its words,
so a caption can only ever name what was drawn. Non-English words are chosen so templates need no
grammatical agreement ("in der Farbe Rot", "de couleur rouge", "de color rojo").
"""

from __future__ import annotations

from typing import Literal

Language = Literal["en", "de", "fr", "es"]
TRANSLATED_LANGUAGES: tuple[Language, ...] = ("de", "fr", "es")

RGB = tuple[int, int, int]

COLOURS: dict[str, RGB] = {
    "red": (214, 39, 40),
    "orange": (250, 130, 20),
    "yellow": (242, 205, 25),
    "green": (44, 160, 44),
    "blue": (31, 90, 205),
    "purple": (128, 60, 170),
    "pink": (240, 115, 185),
    "brown": (135, 85, 45),
    "black": (25, 25, 25),
    "grey": (128, 128, 128),
}
WHITE: RGB = (250, 250, 250)

COLOUR_SYNONYMS_EN: dict[str, tuple[str, ...]] = {
    "grey": ("grey", "gray"),
    "purple": ("purple", "violet"),
}

COLOUR_WORDS: dict[Language, dict[str, str]] = {
    "de": {
        "red": "Rot", "orange": "Orange", "yellow": "Gelb", "green": "Grün", "blue": "Blau",
        "purple": "Lila", "pink": "Rosa", "brown": "Braun", "black": "Schwarz", "grey": "Grau",
        "white": "Weiß",
    },
    "fr": {
        "red": "rouge", "orange": "orange", "yellow": "jaune", "green": "vert", "blue": "bleu",
        "purple": "violet", "pink": "rose", "brown": "marron", "black": "noir", "grey": "gris",
        "white": "blanc",
    },
    "es": {
        "red": "rojo", "orange": "naranja", "yellow": "amarillo", "green": "verde", "blue": "azul",
        "purple": "morado", "pink": "rosa", "brown": "marrón", "black": "negro", "grey": "gris",
        "white": "blanco",
    },
}

BACKGROUNDS: dict[str, RGB] = {
    "white": (255, 255, 255),
    "cream": (250, 243, 224),
    "light grey": (222, 222, 222),
    "light blue": (208, 226, 245),
    "black": (18, 18, 18),
}
BACKGROUND_PHRASES: dict[Language, dict[str, str]] = {
    "en": {name: f"on a {name} background" for name in BACKGROUNDS},
    "de": {
        "white": "auf weißem Hintergrund", "cream": "auf cremefarbenem Hintergrund",
        "light grey": "auf hellgrauem Hintergrund", "light blue": "auf hellblauem Hintergrund",
        "black": "auf schwarzem Hintergrund",
    },
    "fr": {
        "white": "sur un fond blanc", "cream": "sur un fond crème",
        "light grey": "sur un fond gris clair", "light blue": "sur un fond bleu clair",
        "black": "sur un fond noir",
    },
    "es": {
        "white": "sobre un fondo blanco", "cream": "sobre un fondo crema",
        "light grey": "sobre un fondo gris claro", "light blue": "sobre un fondo azul claro",
        "black": "sobre un fondo negro",
    },
}

NUMBER_WORDS: dict[Language, tuple[str, ...]] = {
    "en": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "de": ("null", "eins", "zwei", "drei", "vier"),
    "fr": ("zéro", "un", "deux", "trois", "quatre"),
    "es": ("cero", "uno", "dos", "tres", "cuatro"),
}

POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
POSITION_PHRASES: dict[Language, dict[str, tuple[str, ...]]] = {
    "en": {
        "top left": ("in the top left", "in the upper left corner", "at the top left"),
        "top right": ("in the top right", "in the upper right corner", "at the top right"),
        "bottom left": ("in the bottom left", "in the lower left corner", "at the bottom left"),
        "bottom right": ("in the bottom right", "in the lower right corner", "at the bottom right"),
        "center": ("in the center", "in the middle", "in the centre"),
    },
    "de": {
        "top left": ("oben links",), "top right": ("oben rechts",), "bottom left": ("unten links",),
        "bottom right": ("unten rechts",), "center": ("in der Mitte",),
    },
    "fr": {
        "top left": ("en haut à gauche",), "top right": ("en haut à droite",),
        "bottom left": ("en bas à gauche",), "bottom right": ("en bas à droite",),
        "center": ("au centre",),
    },
    "es": {
        "top left": ("arriba a la izquierda",), "top right": ("arriba a la derecha",),
        "bottom left": ("abajo a la izquierda",), "bottom right": ("abajo a la derecha",),
        "center": ("en el centro",),
    },
}


def english_plural(noun: str) -> str:
    """Regular English plural, enough for every noun the templates count."""
    return noun + "es" if noun.endswith(("s", "x", "sh", "ch")) else noun + "s"


def join_words(items: list[str], language: Language) -> str:
    """``["a", "b", "c"]`` -> ``"a, b and c"`` with the language's own conjunction."""
    conjunction = {"en": "and", "de": "und", "fr": "et", "es": "y"}[language]
    if len(items) == 1:
        return items[0]
    return f"{', '.join(items[:-1])} {conjunction} {items[-1]}"


def counted(count: int, singular: str, plural: str, language: Language) -> str:
    """``(1, "ein Haus", "Häuser", "de")`` -> ``"ein Haus"``; ``(2, ...)`` -> ``"zwei Häuser"``."""
    return singular if count == 1 else f"{NUMBER_WORDS[language][count]} {plural}"
