"""Layer probe: what each ViT layer's features say about each attribute of a Shapes object.

The SparseCut paper's premise (section 1) is that the mid- and low-level layers of a frozen
encoder carry detail its top layer has discarded. This measures it: for every layer of the ViT
(0 = the embeddings), the patch tokens at the centre of each object's cell (the 2 x 2 tokens
there, concatenated) of the high-resolution crops (view="high") or of the low-resolution view
that LLaVA reads (view="low") are the features of a multinomial logistic regression
(L-BFGS, L2), fitted on the objects of the val split and scored on those of the test split, once
per attribute. Chance is 1/4 (shape), 1/6 (colour), 1/2 (size), 1/3 (texture).
"""

import torch
import torch.nn.functional as F

from fusion import high_res_grid, image_views, patch_tokens, split_views
from sources.shapes import CANVAS, COLORS, GRID, POSITIONS, SHAPES, SIZES, TEXTURES, parse_caption, shapes_split
from sources.data import to_tensor

ATTRIBUTES = {"shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES), "texture": TEXTURES}


@torch.no_grad()
def object_features(vit, split, n_images, view="high"):
    """{layer: (n_objects, 4 D)} and {attribute: (n_objects,)} class indices."""
    images, captions = shapes_split(split, n_images)
    high = view == "high"
    views = image_views(to_tensor(images), vit.config.image_size, high_res=high)   # (5B or B, 3, R, R)
    hidden = vit(vit.normalize(views))                                       # n_layer + 1 x (5B or B, T, D)
    G = vit.config.grid
    per_cell = (2 * G if high else G) // GRID                                # tokens per cell side
    if per_cell < 2 or CANVAS != 2 * vit.config.image_size:
        raise ValueError(f"the probe needs the Shapes canvas ({CANVAS} px) at twice the ViT's resolution and "
                         f"at least 2 x 2 tokens per cell; this ViT has a {G} x {G} grid at {vit.config.image_size} px")
    features = {layer: [] for layer in range(len(hidden))}
    labels = {name: [] for name in ATTRIBUTES}
    objects = [(b, o) for b, caption in enumerate(captions) for o in parse_caption(caption)[0]]
    for layer, states in enumerate(hidden):
        tokens = patch_tokens(states, vit.config.class_token)
        if high:
            full = high_res_grid(split_views(tokens, len(images))[1], G)     # (B, 2G, 2G, D)
        else:
            full = tokens.reshape(len(images), G, G, -1)                     # (B, G, G, D)
        for b, o in objects:
            row, col = divmod(POSITIONS.index(o.position), GRID)
            top, left = row * per_cell + per_cell // 2 - 1, col * per_cell + per_cell // 2 - 1
            features[layer].append(full[b, top:top + 2, left:left + 2].reshape(-1))
    for _, o in objects:
        for name, values in ATTRIBUTES.items():
            labels[name].append(values.index(getattr(o, name)))
    return ({layer: torch.stack(rows) for layer, rows in features.items()},
            {name: torch.tensor(rows) for name, rows in labels.items()})


def fit_and_score(train_x, train_y, test_x, test_y, n_classes, l2=1e-3):
    """Logistic regression on standardised features; accuracy on the test rows."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(train_x.shape[1], n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(((test_x @ weight + bias).argmax(1) == test_y).float().mean())


def layer_probe(vit, n_train=400, n_test=300, view="high"):
    """{attribute: [test accuracy of layer 0, 1, ..., n_layer]}."""
    vit = vit.eval()
    train_x, train_y = object_features(vit, "val", n_train, view)
    test_x, test_y = object_features(vit, "test", n_test, view)
    return {name: [fit_and_score(train_x[layer], train_y[name], test_x[layer], test_y[name], len(values))
                   for layer in sorted(train_x)]
            for name, values in ATTRIBUTES.items()}
