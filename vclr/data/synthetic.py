"""Small synthetic stand-ins for the five datasets, written in their real on-disk formats (contract 1).

The `tiny` profile runs the whole suite on these. Each video shows one object in a scene; the
object's colour, shape, size and position and the scene's colours are random per video. Classes come
in pairs (2k, 2k+1):
- the pair shows in every frame as the scene's texture family (stripes, checks, dots, ...; period,
  angle and phase random per video), in luminance only - like the scene bias of the real datasets
  (water for swimming), a cue that single frames and colour-jittered crops still carry;
- the class within the pair is only in how the object (or the camera) moves: translations,
  growing/shrinking, clockwise/counter-clockwise orbits, camera pans, and two- or three-step
  sequences of these. The two motions of a pair are each other's time reversal: rendered with the
  same sample seed, class 2k+1 is exactly class 2k played backwards, so telling them apart takes
  motion and temporal order.

Horizontal flips: in every dataset but ssv2 each video is mirrored left-right at random and the
motion vocabulary is built modulo that mirror, so a horizontal-flip augmentation never changes the
class. The ssv2 stand-in, like the real dataset ("Pushing something from left to right" vs "... from
right to left"), uses left/right pairs: there a horizontal flip turns a video into its paired class.

ActivityNet's stand-in is untrimmed: 1-2 action segments (the class's scene and object, in motion)
inside background that shows neither: one still, plain grey scene, the same in every video (as real
untrimmed videos cut away to unrelated footage). A frame tells action from background, as the
one-frame-per-snippet TSN features of the localisation protocol need, and it does so the same way in
every video: with the video's own untextured scene as background instead, a TSN fine-tuned on the
12 tiny training videos scored each video's background differently and BMN, trained on 12 videos,
could not learn what background looks like (it lost to random proposals on some seeds). The JSON
segments are the exact times of the action frames.

Everything is derived from the seed: the same seed gives byte-identical annotation files and videos
that decode to identical frames.
"""

from __future__ import annotations

import argparse
import json
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from vclr.errors import VclrError
from vclr.io_utils import atomic_directory

DATASETS = ("k400", "ucf101", "hmdb51", "ssv2", "anet")

# Per dataset: container and codec like the real files, the real frame rate, and small defaults.
VIDEO_FORMATS = {
    "ucf101": {"ext": "avi", "codec": "mpeg4", "codec_tag": "XVID", "fps": 25, "width": 128, "height": 96, "frames": 50},
    "hmdb51": {"ext": "avi", "codec": "mpeg4", "codec_tag": None, "fps": 30, "width": 128, "height": 96, "frames": 60},
    "k400": {"ext": "mp4", "codec": "libx264", "codec_tag": None, "fps": 30, "width": 128, "height": 96, "frames": 60},
    "ssv2": {"ext": "webm", "codec": "libvpx-vp9", "codec_tag": None, "fps": 12, "width": 128, "height": 96, "frames": 24},
    "anet": {"ext": "mp4", "codec": "libx264", "codec_tag": None, "fps": 30, "width": 128, "height": 96, "frames": None},
}
CONTAINER_FORMATS = {"avi": "avi", "mp4": "mp4", "webm": "webm"}
ENCODER_OPTIONS = {
    "mpeg4": {"b": "1000000"},
    # cpu-independent: x264 otherwise picks algorithms by the CPU's features, and on a machine
    # whose cores differ two runs of the same seed gave different bytes (measured here)
    "libx264": {"preset": "veryfast", "crf": "20", "x264-params": "cpu-independent=1"},
    # "good", not "realtime": realtime mode adapts its speed to the wall clock, so its output
    # depends on machine load and the same seed would not give the same video
    "libvpx-vp9": {"deadline": "good", "cpu-used": "5", "crf": "30", "b": "0"},
}

DEFAULT_SIZES = {
    "ucf101": {"classes": 10, "train_per_class": 8, "test_per_class": 4},
    "hmdb51": {"classes": 8, "train_per_class": 7, "test_per_class": 3, "unused_per_class": 2},
    "k400": {"classes": 10, "train_per_class": 10, "val_per_class": 3, "test_per_class": 3},
    "ssv2": {"classes": 8, "train_per_class": 10, "val_per_class": 3, "test_per_class": 3},
    "anet": {"classes": 6, "videos": 8, "min_seconds": 6.0, "max_seconds": 10.0},
}

# ----------------------------------------------------------------------------- real class names

UCF101_CLASSES = (
    "ApplyEyeMakeup ApplyLipstick Archery BabyCrawling BalanceBeam BandMarching BaseballPitch Basketball "
    "BasketballDunk BenchPress Biking Billiards BlowDryHair BlowingCandles BodyWeightSquats Bowling "
    "BoxingPunchingBag BoxingSpeedBag BreastStroke BrushingTeeth CleanAndJerk CliffDiving CricketBowling "
    "CricketShot CuttingInKitchen Diving Drumming Fencing FieldHockeyPenalty FloorGymnastics FrisbeeCatch "
    "FrontCrawl GolfSwing Haircut Hammering HammerThrow HandstandPushups HandstandWalking HeadMassage HighJump "
    "HorseRace HorseRiding HulaHoop IceDancing JavelinThrow JugglingBalls JumpingJack JumpRope Kayaking "
    "Knitting LongJump Lunges MilitaryParade Mixing MoppingFloor Nunchucks ParallelBars PizzaTossing "
    "PlayingCello PlayingDaf PlayingDhol PlayingFlute PlayingGuitar PlayingPiano PlayingSitar PlayingTabla "
    "PlayingViolin PoleVault PommelHorse PullUps Punch PushUps Rafting RockClimbingIndoor RopeClimbing Rowing "
    "SalsaSpin ShavingBeard Shotput SkateBoarding Skiing Skijet SkyDiving SoccerJuggling SoccerPenalty "
    "StillRings SumoWrestling Surfing Swing TableTennisShot TaiChi TennisSwing ThrowDiscus TrampolineJumping "
    "Typing UnevenBars VolleyballSpiking WalkingWithDog WallPushups WritingOnBoard YoYo"
).split()
# The official files spell this class's videos v_HandStandPushups_* inside folder HandstandPushups/.
UCF101_FILE_SPELLING = {"HandstandPushups": "HandStandPushups"}

HMDB51_CLASSES = (
    "brush_hair cartwheel catch chew clap climb climb_stairs dive draw_sword dribble drink eat fall_floor "
    "fencing flic_flac golf handstand hit hug jump kick kick_ball kiss laugh pick pour pullup punch push "
    "pushup ride_bike ride_horse run shake_hands shoot_ball shoot_bow shoot_gun sit situp smile smoke "
    "somersault stand swing_baseball sword sword_exercise talk throw turn walk wave"
).split()

# Real Kinetics-400 labels, the awkward ones (spaces, parentheses, apostrophes) first.
K400_CLASSES = (
    "passing American football (not in game)", "massaging person's head", "hurling (sport)", "air drumming",
    "abseiling", "skiing (not slalom or crosscountry)", "tying knot (not on a tie)", "petting animal (not cat)",
    "zumba", "tai chi", "dancing ballet", "playing guitar", "riding a bike", "eating ice cream",
    "jumping into pool", "making tea", "rock climbing", "shaking hands", "ice skating", "juggling balls",
    "cooking egg", "writing", "swimming backstroke", "yoga", "archery", "bowling", "catching or throwing frisbee",
    "sign language interpreting", "trimming or shaving beard", "waxing legs", "drinking beer", "making a sandwich",
    "playing cello", "high jump", "pushing car", "surfing water", "skiing slalom", "walking the dog",
    "washing dishes", "blowing out candles",
)

ANET_CLASSES = (
    "Long jump", "Playing guitarra", "Walking the dog", "Doing karate", "Making a sandwich", "Brushing teeth",
    "Rock climbing", "Washing dishes", "Skateboarding", "Shoveling snow", "Tennis serve with ball bouncing",
    "Polishing shoes", "Archery", "Hopscotch", "Playing violin", "Preparing salad", "Javelin throw", "Pole vault",
    "Triple jump", "Hammer throw", "Shot put", "Discus throw", "Rope skipping", "Ironing clothes",
    "Mowing the lawn", "Vacuuming floor", "Painting", "Knitting", "Bathing dog", "Swimming",
)
# ActivityNet's taxonomy is a tree under "Root"; the stand-in hangs its leaves under three real top nodes.
ANET_TOP_NODES = ("Sports, Exercise, and Recreation", "Household Activities", "Personal Care")

# Real SSv2 templates. The first ten carry matching motions (pairs are time reversals); later ones
# get generic motions from the vocabulary.
SSV2_TEMPLATES = (
    "Pushing [something] from left to right", "Pushing [something] from right to left",
    "Moving [something] up", "Moving [something] down",
    "Turning the camera left while filming [something]", "Turning the camera right while filming [something]",
    "Moving [something] towards the camera", "Moving [something] away from the camera",
    "Turning the camera downwards while filming [something]", "Turning the camera upwards while filming [something]",
    "Spinning [something] that quickly stops spinning", "Spinning [something] so it continues spinning",
    "Pulling [something] from left to right", "Pulling [something] from right to left",
    "Lifting [something] up completely, then letting it drop down", "Picking [something] up",
    "Putting [something] on a surface", "Taking [something] out of [something]",
    "Showing [something] on top of [something]", "Wiping [something] off of [something]",
    "[Something] falling like a feather or paper", "[Something] falling like a rock",
    "Rolling [something] on a flat surface", "Sliding [something] across a surface",
    "Throwing [something]", "Tearing [something] into two pieces",
    "Folding [something]", "Unfolding [something]",
    "Opening [something]", "Closing [something]",
    "Covering [something] with [something]", "Uncovering [something]",
)
SSV2_NOUNS = (
    "a pen", "cup", "a book", "phone", "remote", "a box", "bottle", "spoon", "a ball", "key", "wallet",
    "paper", "a shoe", "glass", "scissors", "a towel", "lid", "an apple", "charger", "marker",
)

# ----------------------------------------------------------------------------- motion vocabulary
# A motion is a tuple of steps, each taking an equal share of the action time:
#   ("move", dx, dy)  object translation; dx in half frame widths, dy in half frame heights (y down)
#   ("scale", s)      object size multiplied by 2**(s * SCALE_LOG2)
#   ("orbit", sign)   one full circle of the object centre, +1 clockwise on screen
#   ("pan", dx, dy)   camera turn: the whole scene moves by (-dx, -dy) in PAN_FRACTION frame units

SCALE_LOG2 = 0.8
ORBIT_RADIUS = 0.22  # of the frame height
PAN_FRACTION = 0.3
MAX_STEPS = 3

_DIRECTIONS = ((1, 0), (-1, 0), (0, -1), (0, 1), (1, -1), (-1, -1), (1, 1), (-1, 1))


def reverse_motion(motion: tuple) -> tuple:
    """The motion that, played forwards, looks like `motion` played backwards."""
    return tuple(_negate_step(step) for step in reversed(motion))


def mirror_motion(motion: tuple) -> tuple:
    """The motion seen in a left-right mirror."""
    mirrored = []
    for step in motion:
        if step[0] in ("move", "pan"):
            mirrored.append((step[0], -step[1], step[2]))
        elif step[0] == "orbit":
            mirrored.append(("orbit", -step[1]))
        else:
            mirrored.append(step)
    return tuple(mirrored)


def _negate_step(step: tuple) -> tuple:
    if step[0] in ("move", "pan"):
        return (step[0], -step[1], -step[2])
    return (step[0], -step[1])


def _steps_collide(a: tuple, b: tuple) -> bool:
    """Consecutive steps that would read as one step (parallel moves, two scalings, two orbits/pans)."""
    if a[0] != b[0]:
        return False
    if a[0] in ("move", "pan"):
        return a[1] * b[2] - a[2] * b[1] == 0
    return True


def _atoms(mirror_invariant: bool) -> list[tuple]:
    atoms = [("move", dx, dy) for dx, dy in _DIRECTIONS] + [("scale", 1), ("scale", -1)]
    if not mirror_invariant:  # an orbit or pan is its own mirror image's reverse: only without mirroring
        atoms += [("orbit", 1), ("orbit", -1), ("pan", 1, 0), ("pan", -1, 0), ("pan", 0, 1), ("pan", 0, -1)]
    return atoms


def _candidate_motions(mirror_invariant: bool):
    atoms = _atoms(mirror_invariant)
    frontier: list[tuple] = [()]
    for _ in range(MAX_STEPS):
        longer = []
        for prefix in frontier:
            for atom in atoms:
                if prefix and _steps_collide(prefix[-1], atom):
                    continue
                if atom[0] == "pan" and any(step[0] != "pan" for step in prefix):
                    continue  # keep camera turns to pure pan sequences
                if prefix and prefix[0][0] == "pan" and atom[0] != "pan":
                    continue
                longer.append(prefix + (atom,))
        yield from longer
        frontier = longer


def class_motions(dataset: str, num_classes: int) -> list[tuple]:
    """The motion of each class: class 2k+1 is the time reversal of class 2k.

    Indices are the generator's class order (UCF101 classInd order, HMDB51/K400/ANet sorted names,
    SSv2 SSV2_TEMPLATES order), not necessarily the parser's label order (SSv2 labels.json is sorted).
    """
    mirror_invariant = dataset != "ssv2"
    canonical = (lambda m: min(m, mirror_motion(m))) if mirror_invariant else (lambda m: m)
    motions: list[tuple] = []
    seen: set[tuple] = set()
    if dataset == "ssv2":  # the first templates name their motion
        named = [
            (("move", 1, 0),), (("pan", -1, 0),), (("move", 0, -1),), (("scale", 1),), (("pan", 0, 1),),
        ]
        for motion in named:
            motions += [motion, reverse_motion(motion)]
            seen |= {motion, reverse_motion(motion)}
    for motion in _candidate_motions(mirror_invariant):
        if len(motions) >= num_classes:
            break
        forward, backward = canonical(motion), canonical(reverse_motion(motion))
        if forward == backward or forward in seen or backward in seen:
            continue
        seen |= {forward, backward}
        motions += [motion, reverse_motion(motion)]
    if len(motions) < num_classes:
        raise VclrError(f"--classes {num_classes}: the motion vocabulary has only {len(motions)} classes")
    return motions[:num_classes]


def paired_class(class_index: int) -> int:
    """The class whose motion is this class's motion reversed in time."""
    return class_index ^ 1


# ----------------------------------------------------------------------------- rendering


def _appearance(sample_seed: int, width: int, height: int, mirror_invariant: bool) -> dict:
    rng = np.random.default_rng(sample_seed)
    texture_rng = np.random.default_rng([sample_seed, 1])  # its own stream: the draws below stay as they were
    grid = rng.uniform(40, 215, size=(rng.integers(3, 7), rng.integers(3, 7), 3))
    fine_noise_seed = int(rng.integers(2**31))
    colour = rng.uniform(0, 255, size=3)
    while np.abs(colour - grid.mean(axis=(0, 1))).sum() < 150:  # keep the object visible
        colour = rng.uniform(0, 255, size=3)
    return {
        "grid": grid,
        "fine_noise_seed": fine_noise_seed,
        "colour": colour,
        "square": bool(rng.integers(2)),
        "radius": float(rng.uniform(0.10, 0.17) * height),
        "offset": rng.uniform(0, 1, size=2),
        "orbit_start": float(rng.uniform(0, 2 * math.pi)),
        "mirrored": bool(rng.integers(2)) if mirror_invariant else False,
        # no longer used; still drawn so that every later draw, hence every video, keeps its bytes
        "unused_phase": rng.uniform(0, 2 * math.pi, size=2),
        # The scene texture's small per-video variation inside its family: the family, not the video,
        # sets the look (what colour-blind instance discrimination can pick up is then the pair).
        "texture_period": float(texture_rng.uniform(0.15, 0.18) * height),
        "texture_angle": float(texture_rng.uniform(-0.15, 0.15)),
        "texture_phase": texture_rng.uniform(0, 2 * math.pi, size=2),
    }


BACKGROUND_GREY = 118  # the anet stand-in's background frames: plain grey, no texture, no object

TEXTURE_FAMILIES = ("stripes", "checks", "dots", "crosshatch", "waves", "blocks")
TEXTURE_CONTRAST = 40.0  # grey levels either side of the colour layout


def texture_pattern(family: int, appearance: dict, world_width: int, world_height: int) -> np.ndarray:
    """A scene texture in [-1, 1], [H, W]: the family is the class pair's; period, angle (nearly
    fixed) and phase the video's.

    Luminance only and present all over the frame, so it survives colour jitter, grayscale and a crop
    of 20% of the area; its period (>= 12% of the height) survives the blur of the augmentation chain.
    """
    y, x = np.mgrid[0:world_height, 0:world_width].astype(np.float64)
    angle, period = appearance["texture_angle"], appearance["texture_period"]
    u = (x * math.cos(angle) + y * math.sin(angle)) * 2 * math.pi / period + appearance["texture_phase"][0]
    v = (-x * math.sin(angle) + y * math.cos(angle)) * 2 * math.pi / period + appearance["texture_phase"][1]
    name = TEXTURE_FAMILIES[family % len(TEXTURE_FAMILIES)]
    if name == "stripes":
        pattern = np.sin(u)
    elif name == "checks":
        pattern = np.tanh(3 * np.sin(u) * np.sin(v))
    elif name == "dots":
        pattern = 2 * (np.cos(u) * np.cos(v) > 0.5) - 1.0
    elif name == "crosshatch":
        pattern = np.maximum(np.sin(u), np.sin(v))
    elif name == "waves":
        pattern = np.sin(u + 1.5 * np.sin(v / 2))
    else:  # blocks: square pulses along one axis at half the frequency
        pattern = np.sign(np.sin(u / 2)) * 0.5 + np.sign(np.sin(v)) * 0.5
    return pattern.astype(np.float32)


def _background(appearance: dict, world_width: int, world_height: int, texture_family: int | None = None) -> np.ndarray:
    image = Image.fromarray(appearance["grid"].astype(np.uint8)).resize((world_width, world_height), Image.BICUBIC)
    background = np.asarray(image, dtype=np.float32)
    noise = np.random.default_rng(appearance["fine_noise_seed"]).normal(0, 14, size=(world_height, world_width, 1))
    background = background + noise.astype(np.float32)
    if texture_family is not None:
        pattern = texture_pattern(texture_family, appearance, world_width, world_height)
        background = background + TEXTURE_CONTRAST * pattern[..., None]
    return background


def _trajectory(motion: tuple, phase: np.ndarray, appearance: dict, width: int, height: int):
    """Per frame: object offset (x, y) in pixels, log2 size and camera offset (x, y) in pixels.

    `phase` runs from 0 to n per frame: n repetitions of the motion (n=1 for trimmed clips). The path
    is built from cumulative step ends, so reversing the motion reverses the path exactly.
    """
    steps = len(motion)
    object_xy = np.zeros((len(phase), 2))
    camera_xy = np.zeros((len(phase), 2))
    log_size = np.zeros(len(phase))
    whole, frac = np.floor(phase), phase - np.floor(phase)
    whole = np.where((frac == 0) & (phase > 0), whole - 1, whole)  # a completed repetition ends at frac 1
    frac = phase - whole
    for index, step in enumerate(motion):
        local = np.clip(frac * steps - index, 0.0, 1.0)
        # Constant speed, so every frame of the action shows motion (clips sampled anywhere, and
        # ActivityNet segments whose every frame moves); linear progress is symmetric under reversal.
        done = whole + local  # total progress of this step over all repetitions
        if step[0] == "move":
            object_xy += np.outer(done, [step[1] * width / 2, step[2] * height / 2])
        elif step[0] == "pan":
            camera_xy += np.outer(done, [step[1] * width * PAN_FRACTION, step[2] * height * PAN_FRACTION])
        elif step[0] == "scale":
            log_size += done * step[1] * SCALE_LOG2
        else:
            angle = appearance["orbit_start"] + step[1] * 2 * math.pi * done
            centre = np.array([math.cos(appearance["orbit_start"]), math.sin(appearance["orbit_start"])])
            object_xy += ORBIT_RADIUS * height * (np.stack([np.cos(angle), np.sin(angle)], axis=1) - centre)
    return object_xy, log_size, camera_xy


def render_frames(
    motion: tuple,
    sample_seed: int,
    width: int,
    height: int,
    num_frames: int,
    mirror_invariant: bool = True,
    action_spans: list[tuple[int, int]] | None = None,
    texture_family: int | None = None,
) -> np.ndarray:
    """Render one video as uint8 [T, H, W, 3].

    Without `action_spans` the motion spans the whole clip. With spans (untrimmed videos) the motion
    plays once inside each [start, end) frame range; the frames outside every span are background:
    plain BACKGROUND_GREY frames, the same in every video (no scene, texture or object).
    """
    if num_frames < 2:
        raise VclrError(f"a video needs at least 2 frames, got {num_frames}")
    appearance = _appearance(sample_seed, width, height, mirror_invariant)
    if appearance["mirrored"]:
        motion = mirror_motion(motion)
    if action_spans is None:
        phase = np.linspace(0.0, 1.0, num_frames)
    else:
        phase = np.zeros(num_frames)
        for repetition, (start, end) in enumerate(action_spans):
            phase[start:end] = repetition + np.linspace(0.0, 1.0, end - start)
            phase[end:] = repetition + 1
    object_xy, log_size, camera_xy = _trajectory(motion, phase, appearance, width, height)
    radius = appearance["radius"] * 2.0 ** (log_size - log_size.max())
    in_action = np.ones(num_frames, dtype=bool)
    if action_spans is not None:
        in_action[:] = False
        for start, end in action_spans:
            in_action[start:end] = True

    # Screen path = object path minus camera path; shrink the object path until it fits the frame.
    camera_px = np.round(camera_xy - camera_xy.min(axis=0)).astype(int)
    screen = object_xy - camera_px
    margin = radius.max() + 1.5
    extent = screen.max(axis=0) - screen.min(axis=0)
    room = np.maximum(np.array([width, height]) - 2 * margin, 0.0)
    shrink = np.minimum(1.0, room / np.maximum(extent, 1e-9))
    object_xy = object_xy * shrink
    screen = object_xy - camera_px
    slack = room - (screen.max(axis=0) - screen.min(axis=0))
    world_origin = margin + slack * appearance["offset"] - screen.min(axis=0)
    centres = screen + world_origin  # object centre in frame pixels

    world_width, world_height = width + camera_px[:, 0].max(), height + camera_px[:, 1].max()
    world = _background(appearance, int(world_width), int(world_height), texture_family)
    world_u8 = np.clip(np.rint(world), 0, 255).astype(np.uint8)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    colour = appearance["colour"].astype(np.float32)
    for t in range(num_frames):
        cx, cy = camera_px[t]
        if not in_action[t]:  # untrimmed background: one grey scene, the same in every video
            frames[t] = BACKGROUND_GREY
            continue
        frames[t] = world_u8[cy : cy + height, cx : cx + width]
        # Draw only inside the object's box (plus the outline): the rest of the frame is background.
        reach = radius[t] + 2.0
        x0, x1 = max(int(centres[t, 0] - reach), 0), min(int(centres[t, 0] + reach) + 1, width)
        y0, y1 = max(int(centres[t, 1] - reach), 0), min(int(centres[t, 1] + reach) + 1, height)
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
        dx, dy = xs - centres[t, 0], ys - centres[t, 1]
        if appearance["square"]:
            distance = np.maximum(np.abs(dx), np.abs(dy))
        else:
            distance = np.sqrt(dx * dx + dy * dy)
        coverage = np.clip(radius[t] - distance + 0.5, 0.0, 1.0)[..., None]
        outline = np.clip(1.5 - np.abs(radius[t] - distance), 0.0, 1.0)[..., None] * 0.5
        patch = world[cy + y0 : cy + y1, cx + x0 : cx + x1]
        patch = (patch * (1 - coverage) + colour * coverage) * (1 - outline)
        frames[t, y0:y1, x0:x1] = np.clip(np.rint(patch), 0, 255).astype(np.uint8)
    return frames


# ----------------------------------------------------------------------------- video files


def _rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """BT.601 limited-range YUV 4:2:0 in NumPy, packed as PyAV's yuv420p array [H*3/2, W].

    Done here rather than by swscale inside the encoder, whose SIMD code (chosen by CPU features)
    rounds differently: the planes are then a pure function of the pixels on every machine.
    """
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    height, width = y.shape

    def subsample(plane: np.ndarray) -> np.ndarray:
        return plane.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))

    def to_u8(plane: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(plane), 0, 255).astype(np.uint8)

    chroma = np.concatenate([to_u8(subsample(cb)).reshape(-1), to_u8(subsample(cr)).reshape(-1)])
    return np.concatenate([to_u8(y), chroma.reshape(height // 2, width)], axis=0)


def write_video(path: Path, frames: np.ndarray, dataset: str, fps: float) -> None:
    """Encode frames [T,H,W,3] with the dataset's real container and codec."""
    video_format = VIDEO_FORMATS[dataset]
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written in place: the caller writes inside atomic_directory's temporary tree.
    # bitexact: no random segment UID or muxing date (Matroska/WebM), so a seed fixes every byte
    with av.open(str(path), "w", format=CONTAINER_FORMATS[video_format["ext"]],
                 options={"fflags": "+bitexact"}) as container:
        codec = video_format["codec"]
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001), options=dict(ENCODER_OPTIONS[codec]))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # single-threaded encoders give reproducible bytes
        if video_format["codec_tag"]:
            stream.codec_context.codec_tag = video_format["codec_tag"]
        stream.codec_context.time_base = Fraction(1) / stream.codec_context.framerate
        for index, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(_rgb_to_yuv420p(array), format="yuv420p")
            frame.pts = index
            frame.time_base = stream.codec_context.time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ----------------------------------------------------------------------------- datasets


def _sample_seed(seed: int, dataset: str, ordinal: int) -> int:
    return int(np.random.SeedSequence([seed, DATASETS.index(dataset), ordinal]).generate_state(1)[0])


def _check_classes(dataset: str, num_classes: int, names) -> list[str]:
    if not 2 <= num_classes <= len(names):
        raise VclrError(f"--classes {num_classes}: {dataset} supports 2..{len(names)} classes")
    return list(names)


def _crlf(lines: list[str]) -> str:
    return "".join(line + "\r\n" for line in lines)


def _generate_ucf101(root: Path, rng: np.random.Generator, sizes: dict, render) -> dict:
    names = _check_classes("ucf101", sizes["classes"], UCF101_CLASSES)
    chosen = set(["HandstandPushups"] + [n for n in names if n != "HandstandPushups"][: sizes["classes"] - 1])
    classes = [n for n in names if n in chosen]  # official order (classInd numbering)
    train_n, test_n = sizes["train_per_class"], sizes["test_per_class"]
    if test_n > 7 * 7 or train_n > 18 * 7:
        raise VclrError("--train-per-class/--test-per-class: at most 126 train and 49 test clips per class")
    # Split 1 tests groups 1-7, split 2 groups 8-14, split 3 groups 15-21 (the official 7-group blocks);
    # split-1 train clips are spread so splits 2 and 3 also get groups from every block.
    train_groups = [g for offset in range(7) for g in (8 + offset, 15 + offset, 22 + offset) if g <= 25]
    videos = []  # (class index, folder, file name, group)
    for label, name in enumerate(classes):
        placed = [(1 + i % 7, i // 7 + 1) for i in range(test_n)]
        placed += [(train_groups[i % len(train_groups)], i // len(train_groups) + 1) for i in range(train_n)]
        spelling = UCF101_FILE_SPELLING.get(name, name)
        for group, clip in placed:
            videos.append((label, name, f"v_{spelling}_g{group:02d}_c{clip:02d}.avi", group))
    videos.sort(key=lambda v: (v[0], v[2]))
    list_dir = root / "annotations" / "ucfTrainTestlist"
    list_dir.mkdir(parents=True)
    (list_dir / "classInd.txt").write_bytes(_crlf([f"{i + 1} {n}" for i, n in enumerate(classes)]).encode())
    counts = {}
    for split in (1, 2, 3):
        test_groups = range(7 * (split - 1) + 1, 7 * split + 1)
        train = [f"{folder}/{file} {label + 1}" for label, folder, file, group in videos if group not in test_groups]
        test = [f"{folder}/{file}" for label, folder, file, group in videos if group in test_groups]
        (list_dir / f"trainlist{split:02d}.txt").write_bytes(_crlf(train).encode())
        (list_dir / f"testlist{split:02d}.txt").write_bytes(_crlf(test).encode())
        counts[f"split{split}"] = {"train": len(train), "test": len(test)}
    for ordinal, (label, folder, file, _) in enumerate(videos):
        render(root / "videos" / "UCF-101" / folder / file, label, ordinal)
    return {"classes": len(classes), "videos": len(videos), "splits": counts}


# HMDB51 names end in visible body part, camera motion, people count, view and quality tags.
_HMDB_TAGS = (("f", "h", "u", "l"), ("cm", "nm"), ("np1", "np2"), ("fr", "ba", "le", "ri"), ("goo", "med", "bad"))
_HMDB_TITLE_WORDS = ("Synth", "Clip", "Motion", "Home", "Park", "Studio", "Street", "Beach", "Gym", "Field")


def _generate_hmdb51(root: Path, rng: np.random.Generator, sizes: dict, render) -> dict:
    names = _check_classes("hmdb51", sizes["classes"], HMDB51_CLASSES)
    classes = sorted(names[: sizes["classes"]])  # the parser orders classes by file name
    train_n, test_n, unused_n = sizes["train_per_class"], sizes["test_per_class"], sizes["unused_per_class"]
    split_dir = root / "annotations" / "testTrainMulti_7030_splits"
    split_dir.mkdir(parents=True)
    counts = {f"split{s}": {"train": 0, "test": 0, "unused": 0} for s in (1, 2, 3)}
    ordinal = 0
    for label, name in enumerate(classes):
        videos: set[str] = set()
        while len(videos) < train_n + test_n + unused_n:
            title = "_".join(rng.choice(_HMDB_TITLE_WORDS, size=2)) + f"_{rng.integers(1, 100)}"
            tags = [rng.choice(options) for options in _HMDB_TAGS]
            videos.add(f"{title}_{name}_{'_'.join(tags)}_{rng.integers(0, 8)}")
        ordered = sorted(videos)
        for split in (1, 2, 3):
            codes = np.array([1] * train_n + [2] * test_n + [0] * unused_n)[rng.permutation(len(ordered))]
            lines = "".join(f"{video}.avi {code} \n" for video, code in zip(ordered, codes))
            (split_dir / f"{name}_test_split{split}.txt").write_bytes(lines.encode())
            for code, key in ((1, "train"), (2, "test"), (0, "unused")):
                counts[f"split{split}"][key] += int((codes == code).sum())
        for video in ordered:
            render(root / "videos" / name / f"{video}.avi", label, ordinal)
            ordinal += 1
    return {"classes": len(classes), "videos": ordinal, "splits": counts}


_YOUTUBE_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))


def _youtube_ids(rng: np.random.Generator, count: int) -> list[str]:
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < count:
        candidate = "".join(rng.choice(_YOUTUBE_ALPHABET, size=11))
        if candidate not in seen:
            seen.add(candidate)
            ids.append(candidate)
    return ids


def _k400_label_field(label: str) -> str:
    """The 2017 CSVs quote every label that contains a space (and would need to for , or ")."""
    if any(c in label for c in ' ,"'):
        return '"' + label.replace('"', '""') + '"'
    return label


def _generate_k400(root: Path, rng: np.random.Generator, sizes: dict, render) -> dict:
    names = _check_classes("k400", sizes["classes"], K400_CLASSES)
    classes = sorted(names[: sizes["classes"]])
    per_split = {"train": sizes["train_per_class"], "val": sizes["val_per_class"], "test": sizes["test_per_class"]}
    files = {"train": "train.csv", "val": "validate.csv", "test": "test.csv"}
    ids = iter(_youtube_ids(rng, len(classes) * sum(per_split.values())))
    annotation_dir = root / "annotations"
    annotation_dir.mkdir(parents=True)
    jobs = []
    counts = {}
    for split, per_class in per_split.items():
        rows = []
        for label, name in enumerate(classes):
            for _ in range(per_class):
                start = int(rng.integers(0, 300))
                rows.append((name, next(ids), start, start + 10, int(rng.random() < 0.2), label))
        rows.sort(key=lambda r: (r[0], r[1].lower(), r[1]))
        text = "label,youtube_id,time_start,time_end,split,is_cc\n" + "".join(
            f"{_k400_label_field(name)},{yid},{start},{end},{split},{is_cc}\n"
            for name, yid, start, end, is_cc, _ in rows
        )
        (annotation_dir / files[split]).write_bytes(text.encode())
        for name, yid, start, end, _, label in rows:
            jobs.append((root / "videos" / split / f"{yid}_{start:06d}_{end:06d}.mp4", label))
        counts[split] = len(rows)
    for ordinal, (path, label) in enumerate(jobs):
        render(path, label, ordinal)
    return {"classes": len(classes), "videos": len(jobs), "splits": counts}


def _ssv2_label(template: str, placeholders: list[str]) -> str:
    filled = template
    for placeholder in placeholders:
        start = filled.index("[")
        filled = filled[:start] + placeholder + filled[filled.index("]", start) + 1 :]
    return filled[0].lower() + filled[1:]


def _json_lines(items: list[dict]) -> str:
    """The released files' layout: one compact object per line inside [ ]."""
    body = ",\n".join(json.dumps(item, ensure_ascii=False, separators=(",", ":")) for item in items)
    return "[\n" + body + "\n]\n"


def _generate_ssv2(root: Path, rng: np.random.Generator, sizes: dict, render) -> dict:
    templates = _check_classes("ssv2", sizes["classes"], SSV2_TEMPLATES)[: sizes["classes"]]
    names = [t.replace("[", "").replace("]", "") for t in templates]
    label_ids = {name: str(i) for i, name in enumerate(sorted(names))}  # labels.json: sorted, ids in order
    class_of = {name: class_index for class_index, name in enumerate(names)}
    annotation_dir = root / "annotations"
    annotation_dir.mkdir(parents=True)
    pairs = [f" {json.dumps(k, ensure_ascii=False)}:{json.dumps(v)}" for k, v in label_ids.items()]
    labels_text = "{\n" + ",\n".join(pairs) + "\n}\n"
    (annotation_dir / "labels.json").write_bytes(labels_text.encode())
    per_split = {
        "train": sizes["train_per_class"], "validation": sizes["val_per_class"], "test": sizes["test_per_class"]
    }
    total = len(templates) * sum(per_split.values())
    ids = [str(i) for i in rng.choice(np.arange(1, 220848), size=total, replace=False)]
    position = 0
    jobs = []
    counts = {}
    for split, per_class in per_split.items():
        entries = []
        for template in templates:
            for _ in range(per_class):
                count = template.count("[")
                placeholders = [str(p) for p in rng.choice(SSV2_NOUNS, size=count, replace=False)]
                label = _ssv2_label(template, placeholders)
                entries.append({"id": ids[position], "label": label, "template": template, "placeholders": placeholders})
                jobs.append((ids[position], class_of[template.replace("[", "").replace("]", "")]))
                position += 1
        entries = [entries[i] for i in rng.permutation(len(entries))]  # the real files are not grouped by class
        if split == "test":  # ids only; the labels go to test-answers.csv as in the Qualcomm-era release
            answers = "".join(f"{e['id']};{e['template'].replace('[', '').replace(']', '')}\n" for e in entries)
            (annotation_dir / "test-answers.csv").write_bytes(answers.encode())
            entries = [{"id": e["id"]} for e in entries]
        (annotation_dir / f"{split}.json").write_bytes(_json_lines(entries).encode())
        counts[split] = len(entries)
    for ordinal, (video_id, label) in enumerate(jobs):
        render(root / "videos" / "20bn-something-something-v2" / f"{video_id}.webm", label, ordinal)
    return {"classes": len(templates), "videos": len(jobs), "splits": counts}


def _anet_spans(rng: np.random.Generator, num_frames: int, fps: float) -> list[tuple[int, int]]:
    """1-2 non-overlapping action spans of 1.5-3 s, with background before, between and after."""
    count = int(rng.integers(1, 3))
    lengths = [min(int(rng.uniform(1.5, 3.0) * fps), int(0.6 * num_frames)) for _ in range(count)]
    gaps_total = num_frames - sum(lengths)
    if gaps_total < (count + 1) * fps / 2:
        count, lengths = 1, lengths[:1]
        gaps_total = num_frames - lengths[0]
    cuts = np.sort(rng.uniform(0, 1, size=count + 1))
    weights = np.diff(np.concatenate([[0.0], cuts, [1.0]]))[: count + 1]
    gaps = np.floor(gaps_total * weights / weights.sum()).astype(int)
    spans, cursor = [], 0
    for gap, length in zip(gaps[:count], lengths):
        cursor += int(gap)
        spans.append((cursor, cursor + length))
        cursor += length
    return spans


def _generate_anet(root: Path, rng: np.random.Generator, sizes: dict, render) -> dict:
    names = _check_classes("anet", sizes["classes"], ANET_CLASSES)[: sizes["classes"]]
    fps = sizes["fps"]
    if not 0 < sizes["min_seconds"] <= sizes["max_seconds"]:
        raise VclrError(
            f"--min-seconds/--max-seconds: need 0 < min <= max, got {sizes['min_seconds']}, {sizes['max_seconds']}"
        )
    if sizes["min_seconds"] < 2:
        raise VclrError(f"--min-seconds {sizes['min_seconds']}: untrimmed videos need at least 2 s")
    taxonomy = [{"parentName": None, "nodeName": "Root", "nodeId": 0, "parentId": None}]
    for node_id, top in enumerate(ANET_TOP_NODES, start=1):
        taxonomy.append({"parentName": "Root", "nodeName": top, "nodeId": node_id, "parentId": 0})
    for offset, name in enumerate(sorted(names)):
        parent = offset % len(ANET_TOP_NODES)
        taxonomy.append(
            {"parentName": ANET_TOP_NODES[parent], "nodeName": name, "nodeId": 100 + offset, "parentId": parent + 1}
        )
    subsets = ("training", "validation", "testing")
    ids = _youtube_ids(rng, sizes["videos"] * len(subsets))
    database = {}
    jobs = []
    counts = {}
    for subset_index, subset in enumerate(subsets):
        for n in range(sizes["videos"]):
            youtube_id = ids[subset_index * sizes["videos"] + n]
            label = int(rng.integers(len(names)))
            num_frames = int(round(rng.uniform(sizes["min_seconds"], sizes["max_seconds"]) * fps))
            spans = _anet_spans(rng, num_frames, fps)
            segments = [{"segment": [round(s / fps, 2), round(e / fps, 2)], "label": names[label]} for s, e in spans]
            database[youtube_id] = {
                "duration": round(num_frames / fps, 2),
                "subset": subset,
                "resolution": f"{sizes['width']}x{sizes['height']}",
                "url": f"https://www.youtube.com/watch?v={youtube_id}",
                "annotations": segments if subset != "testing" else [],  # the release hides test labels
            }
            jobs.append((root / "videos" / f"v_{youtube_id}.mp4", label, num_frames, spans))
        counts[subset] = sizes["videos"]
    annotation_dir = root / "annotations"
    annotation_dir.mkdir(parents=True)
    document = {"version": "VERSION 1.3", "taxonomy": taxonomy, "database": database}
    (annotation_dir / "activity_net.v1-3.min.json").write_bytes(json.dumps(document).encode())
    for ordinal, (path, label, num_frames, spans) in enumerate(jobs):
        render(path, label, ordinal, num_frames=num_frames, action_spans=spans)
    return {"classes": len(names), "videos": len(jobs), "splits": counts}


GENERATORS = {
    "ucf101": _generate_ucf101,
    "hmdb51": _generate_hmdb51,
    "k400": _generate_k400,
    "ssv2": _generate_ssv2,
    "anet": _generate_anet,
}


def resolve_sizes(dataset: str, **sizes) -> dict:
    """Fill in defaults; None values mean 'use the default'. Frame count from frames or seconds."""
    if dataset not in DATASETS:
        raise VclrError(f"unknown dataset {dataset!r} (expected one of {', '.join(DATASETS)})")
    video_format = VIDEO_FORMATS[dataset]
    allowed = set(DEFAULT_SIZES[dataset]) | {"width", "height", "fps", "seconds"}
    if dataset != "anet":  # untrimmed videos have random lengths: no fixed frame count
        allowed.add("frames")
    given = {k: v for k, v in sizes.items() if v is not None}
    unknown = sorted(set(given) - allowed)
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise VclrError(f"{flags}: not used by the {dataset} generator (it takes {', '.join(sorted(allowed))})")
    if "frames" in given and "seconds" in given:
        raise VclrError("--frames and --seconds: give one, not both")
    if "seconds" in given and ("min_seconds" in given or "max_seconds" in given):
        raise VclrError("--seconds and --min-seconds/--max-seconds: give one, not both")
    resolved = {**DEFAULT_SIZES[dataset], **{k: video_format[k] for k in ("width", "height", "fps")}, **given}
    if not isinstance(resolved["fps"], (int, float)) or resolved["fps"] <= 0:
        raise VclrError(f"--fps {resolved['fps']!r}: must be a positive number")
    if float(resolved["fps"]).is_integer():
        resolved["fps"] = int(resolved["fps"])
    if dataset == "anet" and "seconds" in resolved:  # a nominal length: durations vary +-25% around it
        seconds = resolved.pop("seconds")
        resolved["min_seconds"], resolved["max_seconds"] = 0.75 * seconds, 1.25 * seconds
    elif dataset != "anet":
        if "seconds" in resolved:
            resolved["frames"] = int(round(resolved.pop("seconds") * resolved["fps"]))
        resolved.setdefault("frames", video_format["frames"])
    for key, value in resolved.items():
        if key in ("min_seconds", "max_seconds", "fps"):
            continue
        minimum = {"classes": 2, "frames": 2, "width": 16, "height": 16, "videos": 1}.get(key, 0)
        if not isinstance(value, int) or value < minimum:
            raise VclrError(f"--{key.replace('_', '-')} {value!r}: must be an integer >= {minimum}")
    if resolved["width"] % 2 or resolved["height"] % 2:
        raise VclrError(f"--width/--height {resolved['width']}x{resolved['height']}: must be even (yuv420p)")
    return resolved


def generate_dataset(dataset: str, out_dir: str | Path, seed: int, **sizes) -> dict:
    """Write a synthetic `dataset` in contract 1's raw layout at `out_dir`, atomically; return counts.

    sizes: classes, train_per_class, val_per_class, test_per_class, unused_per_class (hmdb51),
    videos/min_seconds/max_seconds (anet), width, height, fps, frames or seconds. Defaults per dataset
    are in DEFAULT_SIZES and VIDEO_FORMATS.
    """
    resolved = resolve_sizes(dataset, **sizes)
    motions = class_motions(dataset, resolved["classes"])
    mirror_invariant = dataset != "ssv2"
    rng = np.random.default_rng(np.random.SeedSequence([seed, DATASETS.index(dataset), 2**20]))

    def render(path: Path, label: int, ordinal: int, num_frames: int | None = None, action_spans=None) -> None:
        frames = render_frames(
            motions[label], _sample_seed(seed, dataset, ordinal), resolved["width"], resolved["height"],
            num_frames or resolved["frames"], mirror_invariant, action_spans, texture_family=label // 2,
        )
        write_video(path, frames, dataset, resolved["fps"])

    with atomic_directory(out_dir) as tmp:
        counts = GENERATORS[dataset](tmp, rng, resolved, render)
    return {"dataset": dataset, "seed": seed, **counts}


# ----------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--out", required=True, type=Path, help="raw dataset directory to write (replaced whole)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", type=int)
    parser.add_argument("--train-per-class", type=int)
    parser.add_argument("--val-per-class", type=int, help="k400 validate.csv, ssv2 validation.json")
    parser.add_argument("--test-per-class", type=int)
    parser.add_argument("--unused-per-class", type=int, help="hmdb51: clips marked 0 (unused) in each split")
    parser.add_argument("--videos", type=int, help="anet: videos per subset (training, validation, testing)")
    parser.add_argument("--min-seconds", type=float, help="anet: shortest untrimmed video")
    parser.add_argument("--max-seconds", type=float, help="anet: longest untrimmed video")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--fps", type=float, help="frame rate (default: the real dataset's)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--frames", type=int, help="frames per trimmed clip")
    length.add_argument("--seconds", type=float, help="seconds per clip (anet: nominal length, +-25%%)")


def main(args: argparse.Namespace) -> int:
    sizes = {
        name: getattr(args, name)
        for name in ("classes", "train_per_class", "val_per_class", "test_per_class", "unused_per_class", "videos",
                     "min_seconds", "max_seconds", "width", "height", "fps", "frames", "seconds")
    }
    counts = generate_dataset(args.dataset, args.out, args.seed, **sizes)
    print(json.dumps(counts))
    return 0
