"""Fixed reference data of the demo world: departments, names, titles, partners."""

from __future__ import annotations

import unicodedata

import numpy as np

# INSEE department code and an approximate population in thousands (skews every distribution to large ones).
_DEPARTMENT_POPULATION: list[tuple[str, int]] = [
    ("01", 660), ("02", 530), ("03", 335), ("04", 165), ("05", 141), ("06", 1090), ("07", 330), ("08", 270),
    ("09", 153), ("10", 310), ("11", 375), ("12", 280), ("13", 2040), ("14", 700), ("15", 144), ("16", 350),
    ("17", 660), ("18", 300), ("19", 240), ("2A", 160), ("2B", 180), ("21", 535), ("22", 600), ("23", 116),
    ("24", 413), ("25", 545), ("26", 520), ("27", 600), ("28", 430), ("29", 915), ("30", 750), ("31", 1420),
    ("32", 192), ("33", 1650), ("34", 1200), ("35", 1100), ("36", 218), ("37", 610), ("38", 1270), ("39", 260),
    ("40", 415), ("41", 330), ("42", 765), ("43", 227), ("44", 1450), ("45", 680), ("46", 174), ("47", 330),
    ("48", 76), ("49", 820), ("50", 495), ("51", 565), ("52", 170), ("53", 307), ("54", 730), ("55", 184),
    ("56", 760), ("57", 1045), ("58", 200), ("59", 2600), ("60", 830), ("61", 280), ("62", 1460), ("63", 660),
    ("64", 690), ("65", 230), ("66", 480), ("67", 1140), ("68", 765), ("69", 1880), ("70", 235), ("71", 550),
    ("72", 565), ("73", 440), ("74", 830), ("75", 2130), ("76", 1255), ("77", 1420), ("78", 1450), ("79", 375),
    ("80", 570), ("81", 390), ("82", 260), ("83", 1080), ("84", 560), ("85", 685), ("86", 440), ("87", 372),
    ("88", 365), ("89", 335), ("90", 140), ("91", 1300), ("92", 1620), ("93", 1650), ("94", 1400), ("95", 1250),
    ("971", 380), ("972", 355), ("973", 290), ("974", 870), ("976", 300),
]  # fmt: skip

#: The department that keeps exactly three volunteers whatever the scale (small-cell suppression case).
RARE_DEPARTMENT = "48"
RARE_DEPARTMENT_VOLUNTEERS = 3

DEPARTMENTS: np.ndarray = np.array([code for code, _ in _DEPARTMENT_POPULATION], dtype=object)
RARE_DEPARTMENT_INDEX = int(np.flatnonzero(DEPARTMENTS == RARE_DEPARTMENT)[0])


def _department_weights() -> np.ndarray:
    """Population weights raised to a power (skewed to large departments), with Lozère excluded."""
    population = np.array([pop for _, pop in _DEPARTMENT_POPULATION], dtype=np.float64)
    weights = population**1.3
    weights[RARE_DEPARTMENT_INDEX] = 0.0
    return weights / weights.sum()


DEPARTMENT_WEIGHTS = _department_weights()


def _postcode_rules() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per department: postcode base, number of variants, step between variants, first variant."""
    base, variants, step, first = [], [], [], []
    for code, _ in _DEPARTMENT_POPULATION:
        if code == "75":
            base.append(75000), variants.append(20), step.append(1), first.append(1)
        elif code in ("2A", "2B"):
            base.append(20000 if code == "2A" else 20200), variants.append(1), step.append(10), first.append(0)
        elif len(code) == 3:
            base.append(int(code) * 100), variants.append(10), step.append(10), first.append(0)
        else:
            base.append(int(code) * 1000), variants.append(100), step.append(10), first.append(0)
    return (np.array(base), np.array(variants), np.array(step), np.array(first))


POSTCODE_BASE, POSTCODE_VARIANTS, POSTCODE_STEP, POSTCODE_FIRST = _postcode_rules()

FIRST_NAMES: np.ndarray = np.array(
    [
        "Camille", "Léa", "Manon", "Chloé", "Emma", "Inès", "Jade", "Louise", "Sarah", "Zoé", "Hélène", "Gaëlle",
        "Anaïs", "Julie", "Mathilde", "Claire", "Nathalie", "Sophie", "Isabelle", "Aurélie", "Lucas", "Hugo",
        "Louis", "Nathan", "Gabriel", "Jules", "Arthur", "Raphaël", "Théo", "Maxime", "Thomas", "Nicolas",
        "Julien", "Antoine", "Alexandre", "Mehdi", "Karim", "Yanis", "Jérôme", "François", "Mamadou", "Sébastien",
    ],
    dtype=object,
)  # fmt: skip

LAST_NAMES: np.ndarray = np.array(
    [
        "Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand", "Leroy", "Moreau",
        "Simon", "Laurent", "Lefèvre", "Michel", "Garcia", "David", "Bertrand", "Roux", "Vincent", "Fournier",
        "Morel", "Girard", "André", "Mercier", "Dupont", "Lambert", "Bonnet", "François", "Martinez", "Legrand",
        "Garnier", "Faure", "Rousseau", "Blanc", "Guérin", "Muller", "Henry", "Roussel", "Nicolas", "Perrin",
        "Morin", "Mathieu", "Clément", "Gauthier", "Dumont", "Lopez", "Fontaine", "Chevalier", "Robin", "Benali",
        "Diallo", "Nguyen", "Le Gall", "Traoré",
    ],
    dtype=object,
)  # fmt: skip


def _email_part(name: str) -> str:
    """Lower-case ASCII form of a name for an email address ('Le Gall' → 'legall', 'Hélène' → 'helene')."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    return "".join(ch for ch in ascii_name.lower() if ch.isalnum())


FIRST_NAMES_EMAIL: np.ndarray = np.array([_email_part(n) for n in FIRST_NAMES], dtype=object)
LAST_NAMES_EMAIL: np.ndarray = np.array([_email_part(n) for n in LAST_NAMES], dtype=object)
EMAIL_DOMAINS: np.ndarray = np.array(["example.org", "example.com", "example.net", "mail.example.fr"], dtype=object)
EMAIL_DOMAIN_WEIGHTS = np.array([0.4, 0.3, 0.2, 0.1])

CITIES: np.ndarray = np.array(
    [
        "Paris", "Marseille", "Lyon", "Toulouse", "Nice", "Nantes", "Montpellier", "Strasbourg", "Bordeaux",
        "Lille", "Rennes", "Reims", "Toulon", "Saint-Étienne", "Le Havre", "Grenoble", "Dijon", "Angers", "Nîmes",
        "Villeurbanne", "Clermont-Ferrand", "Le Mans", "Aix-en-Provence", "Brest", "Tours", "Amiens", "Limoges",
        "Annecy", "Perpignan", "Metz", "Besançon", "Orléans", "Rouen", "Mulhouse", "Caen", "Nancy", "Ajaccio",
        "Saint-Denis", "Fort-de-France", "Mende",
    ],
    dtype=object,
)  # fmt: skip

ORGANIZATION_KINDS: np.ndarray = np.array(["association", "public_body", "company"], dtype=object)
ORGANIZATION_KIND_WEIGHTS = np.array([0.6, 0.25, 0.15])
ASSOCIATION_WORDS: np.ndarray = np.array(
    ["Entraide", "Solidarité", "Les Amis de", "Horizons", "Partage", "Élan", "Coup de main", "Passerelle"],
    dtype=object,
)
PUBLIC_BODY_WORDS: np.ndarray = np.array(
    ["Mairie de", "CCAS de", "Médiathèque de", "Maison de quartier de", "Centre social de"], dtype=object
)
COMPANY_SUFFIXES: np.ndarray = np.array(
    [" SAS", " & Associés", " Conseil", " Services", " Solidaire SARL"], dtype=object
)

MISSION_DOMAINS: np.ndarray = np.array(
    ["environment", "education", "health", "solidarity", "culture", "sport"], dtype=object
)
MISSION_DOMAIN_WEIGHTS = np.array([0.18, 0.22, 0.12, 0.28, 0.12, 0.08])
MISSION_TITLES: np.ndarray = np.array(
    [
        # environment
        "Nettoyage des berges", "Plantation d'arbres", "Sensibilisation au tri", "Jardin partagé",
        "Recensement de la biodiversité", "Atelier réparation vélo",
        # education
        "Aide aux devoirs", "Soutien scolaire en ligne", "Ateliers lecture", "Accompagnement à l'orientation",
        "Initiation au numérique", "Cours de français langue étrangère",
        # health
        "Accueil à l'hôpital", "Visites aux personnes âgées", "Collecte de sang", "Prévention santé jeunes",
        "Soutien aux aidants", "Animation en EHPAD",
        # solidarity
        "Distribution alimentaire", "Maraude solidaire", "Collecte de vêtements", "Accueil de réfugiés",
        "Épicerie solidaire", "Accompagnement administratif",
        # culture
        "Accueil au festival", "Médiation au musée", "Animation en bibliothèque", "Chantier patrimoine",
        "Ciné-club de quartier", "Atelier théâtre",
        # sport
        "Encadrement d'un club de football", "Course solidaire", "Sport adapté", "Tournoi inter-quartiers",
        "Randonnée accompagnée", "Initiation à la natation",
    ],
    dtype=object,
)  # fmt: skip
TITLES_PER_DOMAIN = 6

MISSION_STATUSES = ("draft", "published", "closed")
APPLICATION_STATUSES = ("pending", "accepted", "refused", "cancelled")
EVENT_TYPES = ("impression", "click", "application")
#: About 8 % of impressions lead to a click and about 10 % of clicks to an application.
EVENT_TYPE_WEIGHTS = np.array([1.0, 0.08, 0.008]) / 1.088

INITIAL_PARTNERS = 12
#: (name, kind, active) of the partners present at day 0.
_INITIAL_PARTNERS: list[tuple[str, str, bool]] = [
    ("Portail Citoyen", "widget", True),
    ("Emploi Solidaire", "jobboard", True),
    ("Agir Ensemble API", "api", True),
    ("Cap Bénévolat", "jobboard", True),
    ("Réseau des Maisons de Quartier", "widget", True),
    ("Jeunes Engagés", "api", True),
    ("Mairie Connect", "widget", True),
    ("Horizon Emploi", "jobboard", True),
    ("Solidarités Locales", "widget", True),
    ("Campus Volontaire", "api", True),
    ("Entraide Numérique", "widget", True),
    ("Annuaire Associatif", "jobboard", False),
]
_LATER_PARTNER_WORDS = ["Widget", "Plateforme", "Relais", "Portail", "Annonces", "Connect", "Agenda", "Réseau"]
_LATER_PARTNER_PLACES = ["Bretagne", "Occitanie", "Grand Est", "Normandie", "Hauts-de-France", "Provence", "Centre"]
PARTNER_KINDS = ("api", "widget", "jobboard")
_KIND_TRAFFIC = {"api": 2.0, "widget": 1.0, "jobboard": 3.0}


def partner(partner_id: int, seed: int) -> tuple[str, str, bool]:
    """Name, kind and active flag of one partner; deterministic from its id and the seed."""
    if partner_id <= INITIAL_PARTNERS:
        return _INITIAL_PARTNERS[partner_id - 1]
    rng = np.random.default_rng([seed, 900, partner_id])
    word = _LATER_PARTNER_WORDS[int(rng.integers(len(_LATER_PARTNER_WORDS)))]
    place = _LATER_PARTNER_PLACES[int(rng.integers(len(_LATER_PARTNER_PLACES)))]
    kind = PARTNER_KINDS[int(rng.integers(len(PARTNER_KINDS)))]
    return f"{word} {place} {partner_id}", kind, True


def partner_traffic_weight(partner_id: int, seed: int) -> float:
    """Share of the traffic a partner sends (0 for an inactive partner)."""
    name, kind, active = partner(partner_id, seed)
    if not active:
        return 0.0
    rng = np.random.default_rng([seed, 901, partner_id])
    return _KIND_TRAFFIC[kind] * float(rng.uniform(0.5, 1.5))


def partner_report_factor(partner_id: int, seed: int) -> float:
    """How a partner's own report differs from our events: 1.0 for half of them, else a few percent off."""
    rng = np.random.default_rng([seed, 902, partner_id])
    if rng.random() < 0.5:
        return 1.0
    return float(1.0 + rng.choice([-1.0, 1.0]) * rng.uniform(0.01, 0.06))
