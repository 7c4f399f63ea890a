"""DPO batches carry exactly SFT's token ids: the same Vicuna v1 prompt, the same answer labels."""

from __future__ import annotations

import torch

from lmmtune.data.batches import ImageLoader, TokenizedConversation
from lmmtune.data.images import DEFAULT_MAX_PIXELS
from lmmtune.data.pairs import PreferenceCollator, as_rejected, last_answer_labels
from lmmtune.data.prompt import IGNORE_INDEX
from lmmtune.data.records import Sample
from lmmtune.stages.dpo import pair_index
from tests.data.helpers import save_image


def pair(tmp_path, turns, rejected, image=True) -> Sample:
    path = save_image(tmp_path / "a.png") if image else None
    return Sample(
        id="p", turns=turns, image=str(path) if path else None, extra={"rejected": rejected}
    )


def test_pair_batch_holds_sft_ids_and_sft_prompt(tmp_path, tiny_processor):
    sample = pair(tmp_path, [("Is there a lesion?", "yes")], "no")
    sft = TokenizedConversation(tiny_processor, 1024)
    collator = PreferenceCollator([sample], tiny_processor, 1024, DEFAULT_MAX_PIXELS)

    batch = collator(pair_index([sample]).to_list())

    for row, side in enumerate((sample, as_rejected(sample))):
        ids, labels = sft(side)
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :length].tolist() == ids
        completion = batch["completion_mask"][row, :length].bool().tolist()
        assert completion == [label != IGNORE_INDEX for label in labels]
        prompt_length = completion.index(True)
        assert ids[:prompt_length] == sft.prompt_ids(side)  # what generation is prompted with
    assert batch["input_ids"][0].tolist() != batch["input_ids"][1].tolist()
    image = ImageLoader(tiny_processor, DEFAULT_MAX_PIXELS)(sample)
    assert batch["pixel_values"].shape[0] == 2
    assert torch.equal(batch["pixel_values"][0], image) and torch.equal(
        batch["pixel_values"][1], image
    )


def test_multi_turn_pairs_score_only_the_last_answer(tmp_path, tiny_processor):
    sample = pair(tmp_path, [("Is there a lesion?", "yes"), ("Which side?", "left")], "right")
    ids, labels = TokenizedConversation(tiny_processor, 1024)(sample)

    last = last_answer_labels(labels)

    kept = [i for i, label in enumerate(last) if label != IGNORE_INDEX]
    assert kept and kept == list(range(kept[0], kept[-1] + 1))
    assert tiny_processor.tokenizer.decode([ids[i] for i in kept]).strip().startswith("left")
    assert sum(label != IGNORE_INDEX for label in labels) > len(kept)  # the first answer too
