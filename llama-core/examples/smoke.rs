use llama_core::*;
fn main() -> Result<()> {
    let path = std::env::args().nth(1).unwrap();
    let t0 = std::time::Instant::now();
    let model = Model::load(&path, ModelOptions::default())?;
    eprintln!("loaded {:?} in {:?}", model, t0.elapsed());
    let prompt = std::env::args()
        .nth(2)
        .unwrap_or("The capital of France is".into());
    let ids = model.tokenize(&prompt, true, true)?;
    eprintln!("ids {:?}", ids);
    let mut s = model.session(SessionOptions::default())?;
    let t0 = std::time::Instant::now();
    s.eval(&ids)?;
    eprintln!("prefill {:?}", t0.elapsed());
    let mut out = vec![];
    let t0 = std::time::Instant::now();
    for _ in 0..48 {
        let l = s.logits().unwrap();
        let next = l
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32;
        out.push(next);
        if model.tokenizer().is_eog(next) {
            break;
        }
        s.eval(&[next])?;
    }
    eprintln!("decode {} tok in {:?}", out.len(), t0.elapsed());
    println!("{:?}\n{}", out, model.detokenize(&out, false)?);
    Ok(())
}
