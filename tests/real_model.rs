//! Checks against real THUDM downloads, which cannot be fetched on CI machines: run them with
//! `CHATGLM3_DIR=/models/chatglm3-6b CHATGLM2_DIR=/models/chatglm2-6b cargo test --release
//! --test real_model -- --ignored`. The expected ids are facts from the official tokenizer.

use chathub::{Engine, Message, ModelFamily};

fn dir(var: &str) -> std::path::PathBuf {
    std::env::var_os(var)
        .unwrap_or_else(|| panic!("set {var} to a model directory"))
        .into()
}

#[test]
#[ignore = "needs a real chatglm3-6b download in CHATGLM3_DIR"]
fn chatglm3_prompt_matches_the_official_builder() {
    let tokenizer = chathub::load_tokenizer(dir("CHATGLM3_DIR")).expect("loads");
    let ids: Vec<u32> = [
        "[MASK]",
        "[gMASK]",
        "[sMASK]",
        "sop",
        "eop",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|observation|>",
    ]
    .iter()
    .map(|t| tokenizer.special_id(t).expect("chatglm3 has it"))
    .collect();
    assert_eq!(ids, (64789..=64797).collect::<Vec<u32>>());
    let engine = Engine::load(dir("CHATGLM3_DIR")).expect("loads");
    assert_eq!(engine.family(), ModelFamily::ChatGlm3);
    assert_eq!(
        engine
            .prompt_ids("如何准备数据分析师面试？", &[])
            .expect("ids"),
        vec![64790, 64792, 64795, 30910, 13, 51310, 32080, 31786, 43454, 33605, 31514, 64796]
    );
    assert_eq!(
        engine
            .stop_ids()
            .iter()
            .take(3)
            .copied()
            .collect::<Vec<_>>(),
        vec![2, 64795, 64797]
    );
}

#[test]
#[ignore = "needs a real chatglm2-6b download in CHATGLM2_DIR"]
fn chatglm2_prompt_matches_the_official_builder() {
    let engine = Engine::load(dir("CHATGLM2_DIR")).expect("loads");
    assert_eq!(engine.family(), ModelFamily::ChatGlm2);
    // "[Round 1]\n\n问：你好\n\n答：" with [gMASK] sop in front.
    assert_eq!(
        engine.prompt_ids("你好", &[] as &[Message]).expect("ids"),
        vec![
            64790, 64792, 790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211, 39701, 13,
            13, 55437, 31211
        ]
    );
}
