"""Caption templates: many wordings of the same attributes, in English, German, French and Spanish.

English captions vary template, synonyms, number style (``three``/``3``) and which optional
attributes they mention, the way alt-text does. Translations (the non-English corruption) are
long enough for a language identifier to recognise them.
"""

from __future__ import annotations

from functools import singledispatch
from typing import Literal

import numpy as np

from curation_platform.demo.attributes import (
    Attributes,
    GlyphAttributes,
    SceneAttributes,
    ShapesAttributes,
    TextureAttributes,
    pick,
)
from curation_platform.demo.vocabulary import (
    BACKGROUND_PHRASES,
    COLOUR_SYNONYMS_EN,
    COLOUR_WORDS,
    NUMBER_WORDS,
    POSITION_PHRASES,
    Language,
    counted,
    english_plural,
    join_words,
)

GENERIC_CAPTIONS = (
    "image", "photo", "picture", "stock image", "untitled", "free download", "click here",
    "thumbnail", "no description available", "download now", "view image", "image not found",
)
_FILE_NAME_CAPTIONS = ("IMG_{number:04d}.jpg", "DSC{number:05d}.JPG", "image_{number}.png", "Screenshot {number}")

GenericFlavour = Literal["boilerplate", "underspecified"]
BOILERPLATE_SHARE = 0.4  # of generic captions; the rest are under-specified but on-topic
_DOMAIN_LEVEL_SHARE = 0.5  # of under-specified captions; the rest name one true attribute
# Under-specified captions: true of the sample's image and of most images of its domain
# ("a photo of a dog"), worded with the domain's own vocabulary.
_UNDERSPECIFIED_EN: dict[type, tuple[str, ...]] = {
    ShapesAttributes: (
        "some geometric shapes", "simple geometric shapes", "a basic geometric shape", "a shape on a background",
        "clip art of shapes", "an illustration of some shapes", "a drawing of a shape",
    ),
    GlyphAttributes: (
        "a character", "a single character", "a typography sample", "a printed character",
        "a letter or a number", "a symbol on a background", "a picture of a character",
    ),
    TextureAttributes: (
        "a pattern", "a colourful pattern", "abstract wallpaper", "a seamless texture", "a background texture",
        "a close-up of fabric", "an abstract pattern",
    ),
    SceneAttributes: (
        "a drawing of a landscape", "a cartoon landscape", "a simple illustration of the countryside",
        "a children's drawing", "a landscape", "an outdoor scene", "a picture of the countryside",
    ),
}

_SHAPE_NOUNS_EN = {
    "circle": ("circle", "disc", "dot"),
    "square": ("square", "block"),
    "triangle": ("triangle",),
    "star": ("star",),
    "hexagon": ("hexagon",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
}
_SHAPE_NOUNS: dict[Language, dict[str, tuple[str, str]]] = {
    "de": {
        "circle": ("ein Kreis", "Kreise"), "square": ("ein Quadrat", "Quadrate"),
        "triangle": ("ein Dreieck", "Dreiecke"), "star": ("ein Stern", "Sterne"),
        "hexagon": ("ein Sechseck", "Sechsecke"), "diamond": ("eine Raute", "Rauten"),
        "cross": ("ein Kreuz", "Kreuze"),
    },
    "fr": {
        "circle": ("un cercle", "cercles"), "square": ("un carré", "carrés"),
        "triangle": ("un triangle", "triangles"), "star": ("une étoile", "étoiles"),
        "hexagon": ("un hexagone", "hexagones"), "diamond": ("un losange", "losanges"),
        "cross": ("une croix", "croix"),
    },
    "es": {
        "circle": ("un círculo", "círculos"), "square": ("un cuadrado", "cuadrados"),
        "triangle": ("un triángulo", "triángulos"), "star": ("una estrella", "estrellas"),
        "hexagon": ("un hexágono", "hexágonos"), "diamond": ("un rombo", "rombos"),
        "cross": ("una cruz", "cruces"),
    },
}
_SIZE_WORDS_EN = {"small": ("small", "little"), "large": ("large", "big")}
_SIZE_WORDS: dict[Language, dict[str, str]] = {
    "de": {"small": "kleiner", "large": "großer"},
    "fr": {"small": "petite", "large": "grande"},
    "es": {"small": "pequeño", "large": "grande"},
}
_SHAPE_TEMPLATES_EN = (
    "{things} {position}",
    "a photo of {things} {background}",
    "{things} {position} {background}",
    "simple geometric shapes: {things} {position}",
    "clip art of {things} {background}",
    "an illustration of {things} {position}",
    "{things}, drawn {position}",
)
_SHAPE_TEMPLATES_EN_MANY = ("{colour} {plural}, {number} of them", "{number} {colour} {plural} arranged {position}")
_SHAPE_TEMPLATES_EN_ONE = ("a single {colour} {noun} {position}", "one {size} {colour} {noun}, a basic geometric shape")
_SHAPE_TEMPLATES: dict[Language, tuple[str, ...]] = {
    "de": (
        "{things} in {colour}, von {size} Größe, {position} {background}",
        "Eine einfache Zeichnung: {things} in der Farbe {colour}, {position}, {background}",
        "Geometrische Formen {background}: {things} in {colour}, {position}",
    ),
    "fr": (
        "{things} de couleur {colour}, de {size} taille, {position} {background}",
        "Un dessin simple avec {things} de couleur {colour} {position} {background}",
        "Formes géométriques {background} : {things} de couleur {colour}, {position}",
    ),
    "es": (
        "{things} de color {colour}, de tamaño {size}, {position} {background}",
        "Un dibujo sencillo con {things} de color {colour} {position} {background}",
        "Formas geométricas {background}: {things} de color {colour}, {position}",
    ),
}

_GLYPH_PHRASES_EN = {
    "digit": ("the digit {c}", "the number {c}", "number {word}", "the numeral {c}"),
    "letter": ("the letter {c}", "a capital {c}", "letter {c}", "uppercase {c}"),
}
_GLYPH_BARE_EN = {"digit": ("number {c}", "digit {c}"), "letter": ("capital letter {c}", "letter {c}")}
_GLYPH_TEMPLATES_EN = (
    "{phrase} in {colour} {background}",
    "{article} {colour} {bare} {background}",
    "{phrase} written in {colour} {background}",
    "a picture of the character '{c}' in {colour}",
    "{colour} {bare} on {background_name}, large and centered",
    "{phrase} printed in {colour} {background}",
    "a typography sample showing {phrase} in {colour}",
)
_GLYPH_PHRASES: dict[Language, dict[str, str]] = {
    "de": {"digit": "die Ziffer {c}", "letter": "der Buchstabe {c}"},
    "fr": {"digit": "le chiffre {c}", "letter": "la lettre {c}"},
    "es": {"digit": "el número {c}", "letter": "la letra {c}"},
}
_GLYPH_TEMPLATES: dict[Language, tuple[str, ...]] = {
    "de": (
        "{phrase} in {colour} {background}",
        "Ein Schriftzeichen {background}: {phrase} in der Farbe {colour}",
        "Typografie mit einem einzelnen Zeichen, {phrase} in {colour}, {background}",
    ),
    "fr": (
        "{phrase} en {colour} {background}",
        "Une image montrant {phrase} de couleur {colour}, {background}",
        "Un caractère {background} : {phrase} en {colour}",
    ),
    "es": (
        "Dibujo sencillo de un solo carácter, {phrase} de color {colour}, {background}",
        "Una imagen que muestra {phrase} de color {colour}, {background}",
        "Un carácter {background}: {phrase} en {colour}",
    ),
}

_PATTERN_WORDS_EN = {  # (adjective, noun)
    "stripes": ("striped", "stripes"),
    "checkerboard": ("checkered", "checkerboard"),
    "dots": ("dotted", "polka dots"),
    "grid": ("grid", "grid lines"),
    "waves": ("wavy", "wavy lines"),
}
_SCALE_WORDS_EN = {"fine": ("fine", "small", "dense"), "coarse": ("coarse", "large", "bold")}
_TEXTURE_TEMPLATES_EN = (
    "{orientation}{noun} in {foreground} and {background}",
    "a {adjective} pattern in {foreground} and {background}",
    "seamless texture of {foreground} {noun} on a {background} background",
    "a background of {scale} {foreground} and {background} {orientation}{noun}",
    "abstract {adjective} wallpaper in {foreground} and {background}",
    "a close-up of {foreground} and {background} {adjective} fabric",
)
_PATTERN_PHRASES: dict[Language, dict[str, str]] = {
    "de": {
        "stripes": "ein Streifenmuster", "checkerboard": "ein Schachbrettmuster", "dots": "ein Punktmuster",
        "grid": "ein Gittermuster", "waves": "ein Wellenmuster",
    },
    "fr": {
        "stripes": "un motif à rayures", "checkerboard": "un motif en damier", "dots": "un motif à pois",
        "grid": "un motif quadrillé", "waves": "un motif de vagues",
    },
    "es": {
        "stripes": "un patrón de rayas", "checkerboard": "un patrón de tablero de ajedrez",
        "dots": "un patrón de lunares", "grid": "un patrón de cuadrícula", "waves": "un patrón de ondas",
    },
}
_ORIENTATION_CLAUSES: dict[Language, str] = {
    "de": ", die Linien verlaufen {orientation}",
    "fr": ", les lignes sont {orientation}",
    "es": ", las líneas son {orientation}",
}
_ORIENTATION_WORDS: dict[Language, dict[str, str]] = {
    "de": {"horizontal": "horizontal", "vertical": "vertikal", "diagonal": "diagonal"},
    "fr": {"horizontal": "horizontales", "vertical": "verticales", "diagonal": "diagonales"},
    "es": {"horizontal": "horizontales", "vertical": "verticales", "diagonal": "diagonales"},
}
_TEXTURE_TEMPLATES: dict[Language, tuple[str, ...]] = {
    "de": (
        "{pattern} in {foreground} und {background}{orientation}",
        "Eine nahtlose Textur: {pattern} in den Farben {foreground} und {background}{orientation}",
    ),
    "fr": (
        "{pattern} aux couleurs {foreground} et {background}{orientation}",
        "Une texture sans couture : {pattern} en {foreground} et {background}{orientation}",
    ),
    "es": (
        "{pattern} en {foreground} y {background}{orientation}",
        "Una textura continua: {pattern} de color {foreground} y {background}{orientation}",
    ),
}

_SCENE_OBJECTS_EN = ("house", "tree", "car")
_SCENE_OBJECTS: dict[Language, dict[str, tuple[str, str]]] = {
    "de": {"house": ("ein Haus", "Häuser"), "tree": ("ein Baum", "Bäume"), "car": ("ein Auto", "Autos")},
    "fr": {"house": ("une maison", "maisons"), "tree": ("un arbre", "arbres"), "car": ("une voiture", "voitures")},
    "es": {"house": ("una casa", "casas"), "tree": ("un árbol", "árboles"), "car": ("un coche", "coches")},
}
_SCENE_TIME_EN = {
    "day": ("during the day", "on a sunny day", "in daylight"),
    "night": ("at night", "at nighttime", "under the night sky"),
}
_SCENE_SKY_EN = {
    "day": ("under a sunny sky", "under a clear blue sky", "with the sun shining"),
    "night": ("under a starry sky", "under the moon", "with the moon and stars"),
}
_SCENE_GROUND_EN = {
    "grass": ("on a grassy field", "on green grass", "in a meadow"),
    "snow": ("in the snow", "on snowy ground", "in a snowy landscape"),
    "sand": ("in the desert", "on sand", "on a sandy plain"),
}
_SCENE_GROUND_ADJECTIVES_EN = {"grass": "grassy", "snow": "snowy", "sand": "sandy"}
_SCENE_TEMPLATES_EN = (
    "{objects} {sky}",
    "a {time_adjective} scene with {objects} and the {celestial}",
    "cartoon landscape {time}: {objects}",
    "a drawing of {objects} {ground}",
    "{objects} {ground} {time}",
    "simple illustration of the countryside {time} with {objects}",
    "a children's drawing of {objects} {ground}, {sky}",
)
_SCENE_WORDS: dict[Language, dict[str, str]] = {
    "de": {
        "day": "am Tag", "night": "bei Nacht", "sun": "Sonne", "moon": "Mond",
        "grass": "Gras", "snow": "Schnee", "sand": "Sand",
    },
    "fr": {
        "day": "de jour", "night": "de nuit", "sun": "le soleil", "moon": "la lune",
        "grass": "d'herbe", "snow": "de neige", "sand": "de sable",
    },
    "es": {
        "day": "de día", "night": "de noche", "sun": "el sol", "moon": "la luna",
        "grass": "hierba", "snow": "nieve", "sand": "arena",
    },
}
_SCENE_TEMPLATES: dict[Language, tuple[str, ...]] = {
    "de": (
        "Eine Zeichnung einer Landschaft {time} mit {celestial}: {objects}. Der Boden ist mit {ground} bedeckt",
        "Eine einfache Illustration {time}: {objects} unter einem Himmel mit {celestial}",
    ),
    "fr": (
        "Un dessin d'un paysage {time} avec {celestial} : {objects}. Le sol est couvert {ground}",
        "Une illustration simple {time} : {objects} sous le ciel, avec {celestial}",
    ),
    "es": (
        "Un dibujo de un paisaje {time} con {celestial}: {objects}. El suelo está cubierto de {ground}",
        "Una ilustración sencilla {time}: {objects} bajo el cielo, con {celestial}",
    ),
}


def generic_caption(attributes: Attributes, rng: np.random.Generator) -> tuple[str, GenericFlavour]:
    """A caption that does not single out the image, and which flavour it is.

    ``boilerplate`` (share ``BOILERPLATE_SHARE``): alt-text or a file name that says nothing about
    any image. ``underspecified``: an on-topic caption that fits the image but also most images of
    its domain, either domain-level ("some geometric shapes") or naming one true attribute only
    ("a red shape"), the kind of caption a contrastive teacher finds moderately similar to many images.
    """
    if rng.random() < BOILERPLATE_SHARE:
        return boilerplate_caption(rng), "boilerplate"
    return underspecified_caption(attributes, rng), "underspecified"


def boilerplate_caption(rng: np.random.Generator) -> str:
    """Boilerplate alt-text that says nothing about the image."""
    if rng.random() < 0.3:
        return pick(rng, _FILE_NAME_CAPTIONS).format(number=int(rng.integers(1, 10_000)))
    return pick(rng, GENERIC_CAPTIONS)


def underspecified_caption(attributes: Attributes, rng: np.random.Generator) -> str:
    """An English caption true of ``attributes`` that fits many other images of its domain."""
    if rng.random() < _DOMAIN_LEVEL_SHARE:
        return pick(rng, _UNDERSPECIFIED_EN[type(attributes)])
    return pick(rng, _one_attribute_captions(attributes, rng))


@singledispatch
def _one_attribute_captions(attributes: Attributes, rng: np.random.Generator) -> tuple[str, ...]:
    """Candidate captions of ``attributes`` that each name exactly one of its attributes."""
    raise TypeError(f"no captions for {type(attributes).__name__}")


@_one_attribute_captions.register
def _(attributes: ShapesAttributes, rng: np.random.Generator) -> tuple[str, ...]:
    colour = _colour_en(rng, attributes.colour)
    return (
        f"{_article(colour)} {colour} shape" if attributes.count == 1 else f"some {colour} shapes",
        f"a shape {BACKGROUND_PHRASES['en'][attributes.background]}",
        "a single shape" if attributes.count == 1 else f"{NUMBER_WORDS['en'][attributes.count]} shapes",
    )


@_one_attribute_captions.register
def _(attributes: GlyphAttributes, rng: np.random.Generator) -> tuple[str, ...]:
    colour = _colour_en(rng, attributes.colour)
    return (
        "a letter" if attributes.kind == "letter" else "a number",
        f"{_article(colour)} {colour} character",
        f"a character {BACKGROUND_PHRASES['en'][attributes.background]}",
    )


@_one_attribute_captions.register
def _(attributes: TextureAttributes, rng: np.random.Generator) -> tuple[str, ...]:
    colour = _colour_en(rng, pick(rng, (attributes.foreground, attributes.background)))
    scale = pick(rng, _SCALE_WORDS_EN[attributes.scale])
    return (f"{_article(colour)} {colour} pattern", f"{_article(scale)} {scale} pattern")


@_one_attribute_captions.register
def _(attributes: SceneAttributes, rng: np.random.Generator) -> tuple[str, ...]:
    counts = {"house": attributes.houses, "tree": attributes.trees, "car": attributes.cars}
    thing = pick(rng, [name for name in _SCENE_OBJECTS_EN if counts[name] > 0])
    return (
        f"a landscape {pick(rng, _SCENE_TIME_EN[attributes.time_of_day])}",
        f"a {_SCENE_GROUND_ADJECTIVES_EN[attributes.ground]} landscape",
        f"a drawing of {_article(thing)} {thing}",
    )


@singledispatch
def describe(attributes: Attributes, rng: np.random.Generator, language: Language = "en") -> str:
    """One caption for ``attributes``; different ``rng`` states give different wordings."""
    raise TypeError(f"no captions for {type(attributes).__name__}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _colour_en(rng: np.random.Generator, colour: str) -> str:
    return pick(rng, COLOUR_SYNONYMS_EN.get(colour, (colour,)))


def _number_en(rng: np.random.Generator, count: int) -> str:
    return str(count) if rng.random() < 0.3 else NUMBER_WORDS["en"][count]


def _capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


@describe.register
def _(attributes: ShapesAttributes, rng: np.random.Generator, language: Language = "en") -> str:
    position = pick(rng, POSITION_PHRASES[language][attributes.position])
    background = BACKGROUND_PHRASES[language][attributes.background]
    if language != "en":
        singular, plural = _SHAPE_NOUNS[language][attributes.shape]
        return _capitalise(
            pick(rng, _SHAPE_TEMPLATES[language]).format(
                things=counted(attributes.count, singular, plural, language),
                colour=COLOUR_WORDS[language][attributes.colour],
                size=_SIZE_WORDS[language][attributes.size],
                position=position,
                background=background,
            )
        )
    noun = pick(rng, _SHAPE_NOUNS_EN[attributes.shape])
    colour = _colour_en(rng, attributes.colour)
    size = pick(rng, _SIZE_WORDS_EN[attributes.size])
    described = f"{size} {colour}" if rng.random() < 0.6 else colour
    if attributes.count == 1:
        things = f"{_article(described)} {described} {noun}"
        templates = _SHAPE_TEMPLATES_EN + _SHAPE_TEMPLATES_EN_ONE
    else:
        things = f"{_number_en(rng, attributes.count)} {described} {english_plural(noun)}"
        templates = _SHAPE_TEMPLATES_EN + _SHAPE_TEMPLATES_EN_MANY
    return pick(rng, templates).format(
        things=things,
        position=position,
        background=background,
        colour=colour,
        noun=noun,
        plural=english_plural(noun),
        number=NUMBER_WORDS["en"][attributes.count],
        size=size,
    )


@describe.register
def _(attributes: GlyphAttributes, rng: np.random.Generator, language: Language = "en") -> str:
    background = BACKGROUND_PHRASES[language][attributes.background]
    if language != "en":
        return _capitalise(
            pick(rng, _GLYPH_TEMPLATES[language]).format(
                phrase=_GLYPH_PHRASES[language][attributes.kind].format(c=attributes.character),
                colour=COLOUR_WORDS[language][attributes.colour],
                background=background,
            )
        )
    character = attributes.character
    word = NUMBER_WORDS["en"][int(character)] if attributes.kind == "digit" else character
    colour = _colour_en(rng, attributes.colour)
    return pick(rng, _GLYPH_TEMPLATES_EN).format(
        phrase=pick(rng, _GLYPH_PHRASES_EN[attributes.kind]).format(c=character, word=word),
        bare=pick(rng, _GLYPH_BARE_EN[attributes.kind]).format(c=character),
        article=_article(colour),
        colour=colour,
        c=character,
        background=background,
        background_name=attributes.background,
    )


@describe.register
def _(attributes: TextureAttributes, rng: np.random.Generator, language: Language = "en") -> str:
    if language != "en":
        orientation = ""
        if attributes.orientation is not None:
            orientation = _ORIENTATION_CLAUSES[language].format(
                orientation=_ORIENTATION_WORDS[language][attributes.orientation]
            )
        return _capitalise(
            pick(rng, _TEXTURE_TEMPLATES[language]).format(
                pattern=_PATTERN_PHRASES[language][attributes.pattern],
                foreground=COLOUR_WORDS[language][attributes.foreground],
                background=COLOUR_WORDS[language][attributes.background],
                orientation=orientation,
            )
        )
    adjective, noun = _PATTERN_WORDS_EN[attributes.pattern]
    return pick(rng, _TEXTURE_TEMPLATES_EN).format(
        foreground=_colour_en(rng, attributes.foreground),
        background=_colour_en(rng, attributes.background),
        orientation=f"{attributes.orientation} " if attributes.orientation else "",
        adjective=adjective,
        noun=noun,
        scale=pick(rng, _SCALE_WORDS_EN[attributes.scale]),
    )


@describe.register
def _(attributes: SceneAttributes, rng: np.random.Generator, language: Language = "en") -> str:
    counts = {"house": attributes.houses, "tree": attributes.trees, "car": attributes.cars}
    present = [name for name in _SCENE_OBJECTS_EN if counts[name] > 0]
    order = [present[int(i)] for i in rng.permutation(len(present))]
    celestial = "sun" if attributes.time_of_day == "day" else "moon"
    if language != "en":
        words = _SCENE_WORDS[language]
        objects = [counted(counts[name], *_SCENE_OBJECTS[language][name], language) for name in order]
        return pick(rng, _SCENE_TEMPLATES[language]).format(
            time=words[attributes.time_of_day],
            celestial=words[celestial],
            objects=join_words(objects, language),
            ground=words[attributes.ground],
        )
    objects = [
        f"a {name}" if counts[name] == 1 else f"{_number_en(rng, counts[name])} {english_plural(name)}"
        for name in order
    ]
    return pick(rng, _SCENE_TEMPLATES_EN).format(
        objects=join_words(objects, "en"),
        sky=pick(rng, _SCENE_SKY_EN[attributes.time_of_day]),
        time=pick(rng, _SCENE_TIME_EN[attributes.time_of_day]),
        time_adjective="daytime" if attributes.time_of_day == "day" else "night",
        celestial=celestial,
        ground=pick(rng, _SCENE_GROUND_EN[attributes.ground]),
    )
